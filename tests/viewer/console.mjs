// node console.mjs BASE_URL STUDY_UID DELIVERY_ID TOKEN OUT_DIR
// Opens pacsnode's console in headless chromium as an admin would: the dashboard, the
// studies list, a study page (its timeline and overlay preview) and the failures page,
// where it re-sends DELIVERY_ID by its button, first with a wrong token, then with the
// right one. Prints what it saw as JSON; saves dashboard.png and study.png in OUT_DIR.
import puppeteer from 'puppeteer-core';

const [base, studyUid, deliveryId, token, out] = process.argv.slice(2);
const browser = await puppeteer.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox'],
});
const seen = { errors: [] };
try {
  const page = await browser.newPage();
  await page.setViewport({ width: 1280, height: 900 });
  page.on('pageerror', (e) => seen.errors.push(String(e)));
  const text = (selector) => page.$eval(selector, (e) => e.textContent.trim());

  await page.goto(`${base}/`, { waitUntil: 'load' });
  seen.dashboard = {
    studiesToday: await text('#studies-today'),
    instancesToday: await text('#instances-today'),
    jobsByState: await text('#jobs-by-state'),
    peers: await text('#peers'),
  };
  await page.screenshot({ path: `${out}/dashboard.png`, fullPage: true });

  await page.goto(`${base}/studies`, { waitUntil: 'load' });
  seen.studies = await page.$$eval('#studies tr', (rows) => rows.length - 1);

  await page.goto(`${base}/studies/${studyUid}`, { waitUntil: 'load' });
  await page.waitForFunction(() => {
    const img = document.querySelector('img.preview');
    return img && img.complete && img.naturalWidth > 0;
  }, { timeout: 60000 });
  seen.study = {
    heading: await text('h2'),
    timelineStages: await page.$$eval('.timeline span', (s) => s.map((e) => e.title)),
    preview: await page.$eval('img.preview', (i) => [i.naturalWidth, i.naturalHeight]),
  };
  await page.screenshot({ path: `${out}/study.png`, fullPage: true });

  // Re-send from the failures page: the button asks for the token (a prompt).
  let answer = 'not-the-token';
  page.on('dialog', (dialog) => dialog.accept(answer));
  const resend = async () => {
    await page.goto(`${base}/failures`, { waitUntil: 'load' });
    const button = `form[action="/api/deliveries/${deliveryId}/resend"] button`;
    const [response] = await Promise.all([
      page.waitForNavigation({ waitUntil: 'load' }), page.click(button)]);
    return { status: response.status(), url: page.url(), body: await page.evaluate(() => document.body.innerText) };
  };
  seen.failedDeliveries = await (async () => {
    await page.goto(`${base}/failures`, { waitUntil: 'load' });
    return page.$$eval('#failed-deliveries tr', (rows) => rows.length - 1);
  })();
  seen.wrongToken = await resend();
  await page.evaluate(() => sessionStorage.clear());
  answer = token;
  seen.rightToken = await resend();
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(seen));
