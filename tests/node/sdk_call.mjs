// One call through an official Node SDK, as tests/test_node_sdks.py describes it in argv[2]
// (JSON: sdk, baseURL, defaultQuery, apiKey, model, stream); prints what the client got as JSON.
import Anthropic from "@anthropic-ai/sdk";
import OpenAI from "openai";

const call = JSON.parse(process.argv[2]);
const options = { baseURL: call.baseURL, apiKey: call.apiKey, defaultQuery: call.defaultQuery, maxRetries: 0 };
const prompt = [{ role: "user", content: "Say hello to the ledger" }];

async function openai() {
  const client = new OpenAI(options);
  const { data, response } = await client.chat.completions
    .create({ model: call.model, messages: prompt, stream: call.stream })
    .withResponse();
  let text = "";
  if (call.stream) {
    for await (const chunk of data) text += chunk.choices[0]?.delta?.content ?? "";
  } else {
    text = data.choices[0].message.content;
  }
  return { text, requestId: response.headers.get("x-lava-request-id") };
}

async function anthropic() {
  const client = new Anthropic(options);
  const { data, response } = await client.messages
    .create({ model: call.model, max_tokens: 5, messages: prompt, stream: call.stream })
    .withResponse();
  let text = "";
  if (call.stream) {
    for await (const event of data) if (event.type === "content_block_delta") text += event.delta.text;
  } else {
    text = data.content[0].text;
  }
  return { text, requestId: response.headers.get("x-lava-request-id") };
}

try {
  console.log(JSON.stringify(await { openai, anthropic }[call.sdk]()));
} catch (error) {
  console.log(JSON.stringify({ error: String(error), status: error.status ?? null, code: error.error?.error?.code ?? error.code ?? null }));
}
