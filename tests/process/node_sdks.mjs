// The official Node SDKs as a user runs them against a gateway: a stream of each, the
// gateway's errors as each SDK raises them, and a stream aborted midway. One JSON line per
// step on stdout; tests/process/test_node_sdks.py starts the gateway and reads them.
// Environment: GATEWAY_URL, OPENAI_KEY, ANTHROPIC_KEY, ONE_REQUEST_KEY (an Anthropic key
// allowed one request an hour). The SDKs come from .node/ (make node-sdks).
import { createRequire } from 'node:module';

const require = createRequire(new URL('../../.node/', import.meta.url));
const OpenAI = require('openai');
const Anthropic = require('@anthropic-ai/sdk');

const { GATEWAY_URL: url, OPENAI_KEY, ANTHROPIC_KEY, ONE_REQUEST_KEY } = process.env;
const said = (step, fields) => console.log(JSON.stringify({ step, ...fields }));
const raised = (error) => ({ class: error.constructor.name, status: error.status, error: error.error });
const chat = { model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'hi' }] };
const message = { model: 'claude-3-5-haiku-latest', max_tokens: 50, messages: [{ role: 'user', content: 'hi' }] };

let attempts = 0; // the HTTP requests an SDK made for one call, its own retries included
const counted = (input, init) => {
  attempts += 1;
  return fetch(input, init);
};
const openai = new OpenAI({ baseURL: `${url}/v1`, apiKey: OPENAI_KEY });
const anthropic = new Anthropic({ baseURL: url, apiKey: ANTHROPIC_KEY });

const { data: stream, request_id } = await openai.chat.completions
  .create({ ...chat, stream: true, stream_options: { include_usage: true } }, { headers: { 'x-request-id': 'node-chat' } })
  .withResponse();
let text = '';
let usage = null;
for await (const chunk of stream) {
  text += chunk.choices[0]?.delta?.content ?? '';
  usage = chunk.usage ?? usage;
}
said('openai stream', { text, usage, request_id });

const answer = await anthropic.messages.stream(message).finalMessage();
said('anthropic stream', { text: answer.content[0].text, usage: answer.usage });

try {
  await new OpenAI({ baseURL: `${url}/v1`, apiKey: 'vk_not_in_the_keys_file', fetch: counted }).chat.completions.create(chat);
} catch (error) {
  said('openai 401', { ...raised(error), attempts });
}

const limited = new Anthropic({ baseURL: url, apiKey: ONE_REQUEST_KEY, fetch: counted });
await limited.messages.create(message);
attempts = 0;
try {
  // Bounded: an SDK told to retry would sleep out the window's hour (Anthropic's honours any wait).
  await limited.messages.create(message, { signal: AbortSignal.timeout(10_000) });
} catch (error) {
  said('anthropic 429', { ...raised(error), attempts, retry_after: error.headers?.get('retry-after') });
}

try {
  await anthropic.messages.create(message, { headers: { 'x-fake-status': '529' }, maxRetries: 0 });
} catch (error) {
  said('anthropic 529', raised(error));
}

const controller = new AbortController();
const long = await openai.chat.completions.create(
  { ...chat, stream: true },
  { headers: { 'x-fake-chunks': '200', 'x-fake-delay-ms': '50', 'x-request-id': 'node-abort' }, signal: controller.signal },
);
let chunks = 0;
try {
  for await (const chunk of long) {
    chunks += 1;
    if (chunks === 2) controller.abort();
  }
} catch (error) {
  said('abort raised', raised(error));
}
said('abort', { chunks });
