// Bundle harness.js (or another entry, e.g. render.js) for the browser with one
// cornerstone version's node_modules:
//   node build.mjs cs-5.6.8 out.js [render.js]
import { build } from 'esbuild';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const [version, outfile, entry = 'harness.js'] = process.argv.slice(2);
await build({
  entryPoints: [path.join(here, entry)],
  bundle: true,
  format: 'iife',
  outfile,
  nodePaths: [path.join(here, version, 'node_modules')],
  logLevel: 'warning',
  define: { 'process.env.NODE_ENV': '"production"' },
});
