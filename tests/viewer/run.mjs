// Open SEGs in headless chromium with a bundled harness:
//   node run.mjs BUNDLE.js JOB.json  -> prints a JSON list, one harness result per SEG
// JOB.json: {"sources": [paths of the source series' files], "segs": [SEG paths]}
import fs from 'node:fs';
import puppeteer from 'puppeteer-core';

const [bundle, jobFile] = process.argv.slice(2);
const job = JSON.parse(fs.readFileSync(jobFile, 'utf8'));
const browser = await puppeteer.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--use-angle=swiftshader', '--enable-unsafe-swiftshader'],
});
try {
  const results = [];
  for (const segPath of job.segs) {
    const page = await browser.newPage();  // a fresh viewer per SEG
    const errors = [];
    page.on('pageerror', (e) => errors.push(String(e)));
    await page.addScriptTag({ content: fs.readFileSync(bundle, 'utf8') });
    const sources = job.sources.map((p) => fs.readFileSync(p).toString('base64'));
    const seg = fs.readFileSync(segPath).toString('base64');
    try {
      const result = await page.evaluate((s, g) => window.pacsnodeLoadSeg(s, g), sources, seg);
      results.push({ ...result, errors });
    } catch (e) {
      results.push({ segments: [], painted: {}, errors: [...errors, String(e)] });
    }
    await page.close();
  }
  process.stdout.write(JSON.stringify(results));
} finally {
  await browser.close();
}
