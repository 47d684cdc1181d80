// node screenshot.mjs BUNDLE.js JOB.json OUT.png
// JOB.json: {"sources": [paths], "seg": path, "slice": SOPInstanceUID, "voi": [lower, upper]}
import fs from 'node:fs';
import puppeteer from 'puppeteer-core';

const [bundle, jobFile, out] = process.argv.slice(2);
const job = JSON.parse(fs.readFileSync(jobFile, 'utf8'));
const browser = await puppeteer.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--use-angle=swiftshader', '--enable-unsafe-swiftshader',
         '--ignore-gpu-blocklist'],
});
try {
  const page = await browser.newPage();
  await page.setViewport({ width: 512, height: 512 });
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  page.on('console', (m) => { if (m.type() === 'error') errors.push(m.text()); });
  await page.addScriptTag({ content: fs.readFileSync(bundle, 'utf8') });
  const sources = job.sources.map((p) => fs.readFileSync(p).toString('base64'));
  const seg = fs.readFileSync(job.seg).toString('base64');
  const labels = await page.evaluate(
    (s, g, k, v) => window.pacsnodeRender(s, g, k, v), sources, seg, job.slice, job.voi);
  const element = await page.$('#viewport');
  await element.screenshot({ path: out });
  process.stdout.write(JSON.stringify({ labels, errors }));
} finally {
  await browser.close();
}
