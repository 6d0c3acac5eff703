// The official OpenAI Node SDK pointed at costmesh's HTTP front door, with only the
// base URL and the key changed.
//
// Env: COSTMESH_BASE_URL (http://host:port/v1) and COSTMESH_API_KEY.
// Asks once (a miss), again (a cache hit), streams an answer, and asks for a model
// that does not exist; prints one line of JSON with what it saw. Exits 1 on any
// unexpected error.

import process from "node:process";

import OpenAI from "openai";

const client = new OpenAI({
  baseURL: process.env.COSTMESH_BASE_URL,
  apiKey: process.env.COSTMESH_API_KEY,
  maxRetries: 0,
});
const messages = [{ role: "user", content: "How do I change my delivery address?" }];

async function ask() {
  const { data, response } = await client.chat.completions
    .create({ model: "auto", messages })
    .withResponse();
  return {
    content: data.choices[0].message.content,
    model: data.model,
    cached: response.headers.get("x-costmesh-cached"),
    cost: response.headers.get("x-costmesh-cost-nano-usd"),
  };
}

async function main() {
  const first = await ask();
  const second = await ask();
  const stream = await client.chat.completions.create({
    model: "auto",
    messages: [{ role: "user", content: "Tell me about the returns policy" }],
    stream: true,
    stream_options: { include_usage: true },
  });
  const pieces = [];
  let usage = null;
  for await (const chunk of stream) {
    if (chunk.choices.length > 0 && chunk.choices[0].delta.content) {
      pieces.push(chunk.choices[0].delta.content);
    }
    if (chunk.usage) usage = chunk.usage;
  }
  let missing = null;
  try {
    await client.chat.completions.create({ model: "no-such-model", messages });
  } catch (error) {
    if (!(error instanceof OpenAI.NotFoundError)) throw error;
    missing = { status: error.status, param: error.param, code: error.code };
  }
  process.stdout.write(
    JSON.stringify({ first, second, stream: { pieces, usage }, missing }) + "\n",
  );
}

main().catch((error) => {
  process.stderr.write(`${error.stack ?? error}\n`);
  process.exit(1);
});
