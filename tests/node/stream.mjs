// Streams one chat completion through oaproxy with the official openai Node
// SDK and prints what the SDK's iterator yielded, as one JSON line:
// {"text": ..., "ids": [...], "finish": [...], "roles": n}.
// Usage: node stream.mjs BASE_URL API_KEY MODEL
import OpenAI from "openai";

const [baseURL, apiKey, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 15000 });
const stream = await client.chat.completions.create({
  model,
  messages: [{ role: "user", content: "hi" }],
  stream: true,
});
let text = "";
const ids = new Set();
const finish = [];
let roles = 0;
for await (const chunk of stream) {
  ids.add(chunk.id);
  for (const choice of chunk.choices) {
    if (choice.delta.role) roles += 1;
    if (choice.delta.content) text += choice.delta.content;
    if (choice.finish_reason) finish.push(choice.finish_reason);
  }
}
console.log(JSON.stringify({ text, ids: [...ids], finish, roles }));
