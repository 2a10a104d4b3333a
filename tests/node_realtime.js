// Drives openai-node's realtime WebSocket client (openai/realtime/ws) through
// the proxy: BASE is the proxy's https:// base URL (the SDK always dials
// wss://), CA the certificate authority to trust, KEY the API key.  Prints
// the event types it saw, as JSON, once the response is done.
const fs = require("fs");
const { OpenAI } = require("openai");
const { OpenAIRealtimeWS } = require("openai/realtime/ws");

const client = new OpenAI({ apiKey: process.env.KEY, baseURL: process.env.BASE });
const rt = new OpenAIRealtimeWS(
  { model: "gpt-realtime", options: { ca: fs.readFileSync(process.env.CA) } },
  client,
);
const seen = [];
rt.socket.on("open", () => rt.send({ type: "response.create" }));
rt.on("event", (event) => {
  seen.push(event.type);
  if (event.type === "response.done") rt.close();
});
rt.on("error", (error) => {
  console.error(String(error));
  process.exit(1);
});
rt.socket.on("close", () => {
  console.log(JSON.stringify(seen));
  process.exit(0);
});
setTimeout(() => {
  console.error("timed out; saw " + JSON.stringify(seen));
  process.exit(2);
}, 10000);
