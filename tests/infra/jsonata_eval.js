// Evaluate one JSONata expression as Step Functions does: $states bound to the state's
// input/result/errorOutput. stdin: {"expr": "...", "states": {...}}; stdout: the JSON value.
const jsonata = require("jsonata");
let data = "";
process.stdin.on("data", (chunk) => { data += chunk; });
process.stdin.on("end", async () => {
  const { expr, states } = JSON.parse(data);
  try {
    const value = await jsonata(expr).evaluate({}, { states });
    process.stdout.write(JSON.stringify(value === undefined ? null : value));
  } catch (err) {
    process.stderr.write(`JSONata error in ${expr}: ${err.message}\n`);
    process.exit(3);
  }
});
