// The SDK against a real `rerank serve`: tests/test_sdks.py starts the stack, sets the environment below,
// runs this suite (node --test) and compares the answers it writes with the Python SDK's.
//
//   RERANK_TARGET          a plaintext frontend (host:port)
//   RERANK_SDK_CASES       the shared requests (JSON); RERANK_SDK_ANSWERS: where this suite writes its answers
//   RERANK_SECURE_TARGET   a frontend with mTLS, a bearer token and a small max_total_tokens, and
//   RERANK_TLS_CA, RERANK_TLS_CERT, RERANK_TLS_KEY, RERANK_TOKEN: what its clients need

import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import { createConnection, createServer, type Server, type Socket } from "node:net";
import { after, describe, test } from "node:test";

import {
  AuthenticationError,
  backoffMs,
  buildRerankRequest,
  buildScoreRequest,
  CancelledError,
  Code,
  fromStreamError,
  type GetModelInfoResponse,
  type Interceptor,
  InvalidRequestError,
  ModelNotFoundError,
  RerankClient,
  RerankError,
  type RerankOptions,
  type RerankResponse,
  type RerankStreamRequest,
  RerankTimeoutError,
  ResourceExhaustedError,
  type ScoreResponse,
  streamRequest,
  tlsCredentials,
  truncationValue,
  UnavailableError,
} from "@rerank-service/client";

function env(name: string): string {
  const value = process.env[name];
  if (!value) {
    throw new Error(`${name} is not set: run this suite through tests/test_sdks.py (it starts the server)`);
  }
  return value;
}

const TARGET = env("RERANK_TARGET");
const clients: RerankClient[] = [];
function client(target: string = TARGET, options: ConstructorParameters<typeof RerankClient>[1] = {}): RerankClient {
  const made = new RerankClient(target, { timeoutMs: 60_000, ...options });
  clients.push(made);
  return made;
}
after(() => clients.forEach((c) => c.close()));

// -- the shared cases, answered in the shape tests/test_sdks.py compares --------------------------------

type Options = Record<string, unknown>;
interface Cases {
  rerank: { query: string; documents: string[]; options: Options }[];
  score: { pairs: [string, string][]; options: Options }[];
  stream: { id: string; query: string; documents: string[]; options: Options }[];
  request_id: string[];
}

function camelCase(options: Options): RerankOptions {
  return Object.fromEntries(
    Object.entries(options).map(([key, value]) => [key.replace(/_([a-z])/g, (_, c: string) => c.toUpperCase()), value]),
  );
}

const usage = (u: { inputTokens: bigint; truncatedDocuments: number; modelInputs: number } | undefined) => ({
  input_tokens: Number(u?.inputTokens),
  truncated_documents: u?.truncatedDocuments,
  model_inputs: u?.modelInputs,
});

function rerankAnswer(response: RerankResponse) {
  return {
    model: response.model,
    results: response.results.map((r) => ({
      index: r.index,
      score: r.score,
      logit: r.logit,
      document: r.document ?? null,
      windows: r.windows,
      truncated: r.truncated,
    })),
    usage: usage(response.usage),
  };
}

function scoreAnswer(response: ScoreResponse) {
  return {
    model: response.model,
    scores: response.scores.map((s) => ({ score: s.score, logit: s.logit, windows: s.windows, truncated: s.truncated })),
    usage: usage(response.usage),
  };
}

function modelInfoAnswer(info: GetModelInfoResponse) {
  const limits = info.limits;
  return {
    model: info.model,
    max_length: info.maxLength,
    precision: info.precision,
    triton_model_name: info.tritonModelName,
    triton_model_version: info.tritonModelVersion,
    tokenizer: info.tokenizer,
    limits: {
      max_documents: limits?.maxDocuments,
      max_total_tokens: Number(limits?.maxTotalTokens),
      max_query_tokens: limits?.maxQueryTokens,
      max_message_bytes: Number(limits?.maxMessageBytes),
      default_chunk_overlap: limits?.defaultChunkOverlap,
    },
  };
}

test("answers the shared cases (rerank, score, rerankStream with ids, modelInfo)", async () => {
  const cases = JSON.parse(readFileSync(env("RERANK_SDK_CASES"), "utf8")) as Cases;
  const sdk = client();
  const rerank = [];
  for (const c of cases.rerank) {
    rerank.push(rerankAnswer(await sdk.rerank(c.query, c.documents, camelCase(c.options))));
  }
  const score = [];
  for (const c of cases.score) {
    score.push(scoreAnswer(await sdk.score(c.pairs, camelCase(c.options))));
  }
  const stream: Record<string, unknown> = {};
  const requests = cases.stream.map((c) => streamRequest(c.id, c.query, c.documents, camelCase(c.options)));
  for await (const answer of sdk.rerankStream(requests)) {
    assert.ok(!(answer.id in stream), `answered twice: ${answer.id}`);
    if (answer.outcome.case === "response") {
      stream[answer.id] = { response: rerankAnswer(answer.outcome.value) };
    } else if (answer.outcome.case === "error") {
      const error = fromStreamError(answer.outcome.value);
      stream[answer.id] = {
        error: { code: error.code, fields: error.fieldViolations.map((v) => v.field) },
      };
    }
  }
  const modelInfo = modelInfoAnswer(await sdk.modelInfo());
  const models = await sdk.listModels();
  const listModels = { default_model: models.defaultModel, models: models.models.map(modelInfoAnswer) };
  const requestIds = [];
  for (const requestId of cases.request_id) {
    const error = await failure(() => sdk.rerank("", ["a document"], { requestId }));
    const fields = error.fieldViolations.map((v) => v.field);
    requestIds.push({ code: error.code, fields, request_id: error.requestId ?? null });
  }
  const answers = { rerank, score, stream, request_id: requestIds, model_info: modelInfo, list_models: listModels };
  writeFileSync(env("RERANK_SDK_ANSWERS"), JSON.stringify(answers));
});

// -- errors: one class per kind, with the code, the message and the fields at fault -----------------------

async function failure(call: () => Promise<unknown>): Promise<RerankError> {
  try {
    await call();
  } catch (error) {
    assert.ok(error instanceof RerankError, `not a RerankError: ${String(error)}`);
    return error;
  }
  assert.fail("the call succeeded");
}

describe("errors", () => {
  test("INVALID_ARGUMENT: InvalidRequestError with the field violations", async () => {
    const error = await failure(() => client().rerank("", ["a document"]));
    assert.ok(error instanceof InvalidRequestError);
    assert.equal(error.code, Code.InvalidArgument);
    assert.equal(error.name, "InvalidRequestError");
    assert.match(error.message, /^INVALID_ARGUMENT: /);
    assert.deepEqual(
      error.fieldViolations.map((v) => v.field),
      ["query"],
    );
    assert.ok(error.fieldViolations[0]?.description);

    const pairs = await failure(() => client().score([], { maxLength: 100_000 }));
    assert.ok(pairs instanceof InvalidRequestError);
    assert.ok(pairs.fieldViolations.some((v) => v.field === "pairs"), JSON.stringify(pairs.fieldViolations));
  });

  test("NOT_FOUND: ModelNotFoundError naming the served models", async () => {
    const sdk = client();
    const served = (await sdk.listModels()).defaultModel;
    assert.equal((await sdk.modelInfo({ model: served })).tritonModelName, served);
    for (const call of [
      () => sdk.rerank("q", ["d"], { model: "no-such-model" }),
      () => sdk.score([["q", "d"]], { model: "no-such-model" }),
      () => sdk.modelInfo({ model: "no-such-model" }),
    ]) {
      const error = await failure(call);
      assert.ok(error instanceof ModelNotFoundError, String(error));
      assert.equal(error.code, Code.NotFound);
      assert.ok(error.details.includes(served), error.details);
      assert.deepEqual(
        error.fieldViolations.map((v) => v.field),
        ["model"],
      );
    }
  });

  test("DEADLINE_EXCEEDED: RerankTimeoutError", async () => {
    const documents = Array.from({ length: 200 }, (_, i) => `document ${i} `.repeat(40));
    const error = await failure(() => client().rerank("a query", documents, { timeoutMs: 1 }));
    assert.ok(error instanceof RerankTimeoutError, String(error));
    assert.equal(error.code, Code.DeadlineExceeded);
  });

  test("a deadline past what a Node timer holds (24.8 days, Infinity) is a long one, not a call timed out at once", async () => {
    const far = client(TARGET, { timeoutMs: 3e9 });
    assert.equal((await far.rerank("q", ["a", "b"])).results.length, 2);
    assert.equal((await far.score([["q", "a"]], { timeoutMs: Number.POSITIVE_INFINITY })).scores.length, 1);
    assert.ok((await far.listModels({ timeoutMs: 2 ** 31 })).models.length > 0);
    for await (const answer of far.rerankStream([streamRequest("far", "q", ["a"])], { timeoutMs: Number.MAX_SAFE_INTEGER })) {
      assert.equal(answer.outcome.case, "response");
    }
  });

  test("UNAUTHENTICATED: AuthenticationError without the token or with a wrong one", async () => {
    const credentials = secureCredentials();
    for (const token of [undefined, "not-the-token"]) {
      const error = await failure(() => client(env("RERANK_SECURE_TARGET"), { credentials, token }).rerank("q", ["d"]));
      assert.ok(error instanceof AuthenticationError, String(error));
      assert.equal(error.code, Code.Unauthenticated);
    }
  });

  test("RESOURCE_EXHAUSTED: ResourceExhaustedError past max_total_tokens", async () => {
    const secure = client(env("RERANK_SECURE_TARGET"), { credentials: secureCredentials(), token: env("RERANK_TOKEN") });
    const limit = Number((await secure.modelInfo()).limits?.maxTotalTokens);
    const documents = Array.from({ length: 8 }, (_, i) => `document ${i} `.repeat(Math.ceil(limit / 8)));
    const error = await failure(() => secure.rerank("a query", documents));
    assert.ok(error instanceof ResourceExhaustedError, String(error));
    assert.equal(error.code, Code.ResourceExhausted);
    assert.ok(error.fieldViolations.length > 0);
  });

  test("UNAVAILABLE: UnavailableError once the server stops", async () => {
    const proxy = await TcpProxy.start(TARGET);
    const sdk = client(proxy.target, { retries: 1 });
    assert.equal((await sdk.rerank("q", ["d"])).results.length, 1);
    await proxy.close();
    const error = await failure(() => sdk.rerank("q", ["d"]));
    assert.ok(error instanceof UnavailableError, String(error));
    assert.equal(error.code, Code.Unavailable);
    const stream = await failure(async () => {
      for await (const _ of sdk.rerankStream([streamRequest("s", "q", ["d"])])) {
        // no answer can come
      }
    });
    assert.ok(stream instanceof UnavailableError, String(stream));
  });
});

// -- TLS, mTLS and the token ------------------------------------------------------------------------------

function secureCredentials(withClientCertificate = true) {
  return tlsCredentials({
    rootCertificates: env("RERANK_TLS_CA"),
    ...(withClientCertificate ? { certificateChain: env("RERANK_TLS_CERT"), privateKey: env("RERANK_TLS_KEY") } : {}),
  });
}

test("mTLS with the token is served the same ranking as plaintext; no client certificate, no service", async () => {
  const documents = ["Beijing", "The weather is nice today", "Shanghai"];
  const secure = client(env("RERANK_SECURE_TARGET"), { credentials: secureCredentials(), token: env("RERANK_TOKEN") });
  const plain = await client().rerank("what is the capital of China?", documents);
  const overTls = await secure.rerank("what is the capital of China?", documents);
  assert.deepEqual(
    overTls.results.map((r) => r.index),
    plain.results.map((r) => r.index),
  );
  const anonymous = client(env("RERANK_SECURE_TARGET"), {
    credentials: secureCredentials(false),
    token: env("RERANK_TOKEN"),
    retries: 0,
  });
  await failure(() => anonymous.rerank("q", ["d"]));
  // A handshake that fails (a CA that does not sign the server's certificate; TLS to a plaintext port) is
  // the server unavailable, as in the other SDKs, not a server fault.
  for (const [target, credentials] of [
    [env("RERANK_SECURE_TARGET"), {}],
    [TARGET, secureCredentials()],
  ] as const) {
    const refused = await failure(() => client(target, { credentials, retries: 0 }).rerank("q", ["d"]));
    assert.ok(refused instanceof UnavailableError, String(refused));
  }
});

// -- retries: UNAVAILABLE is retried with backoff, within the attempts allowed ----------------------------

/** A TCP proxy to the server that drops its first `refuse` connections at once (the server unavailable). */
class TcpProxy {
  connections = 0;
  private readonly sockets = new Set<Socket>();

  private constructor(
    private readonly server: Server,
    readonly target: string,
  ) {}

  static async start(upstream: string, refuse = 0): Promise<TcpProxy> {
    const [host, port] = [upstream.slice(0, upstream.lastIndexOf(":")), Number(upstream.slice(upstream.lastIndexOf(":") + 1))];
    let proxy: TcpProxy | undefined;
    const server = createServer((socket) => {
      proxy!.connections += 1;
      if (proxy!.connections <= refuse) {
        socket.destroy();
        return;
      }
      const upstreamSocket = createConnection({ host, port });
      for (const s of [socket, upstreamSocket]) {
        proxy!.sockets.add(s);
        s.on("error", () => s.destroy());
        s.on("close", () => proxy!.sockets.delete(s));
      }
      socket.pipe(upstreamSocket).pipe(socket);
      socket.on("close", () => upstreamSocket.destroy());
      upstreamSocket.on("close", () => socket.destroy());
    });
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    const address = server.address();
    assert.ok(address && typeof address === "object");
    proxy = new TcpProxy(server, `127.0.0.1:${address.port}`);
    return proxy;
  }

  async close(): Promise<void> {
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    this.sockets.forEach((s) => s.destroy());
    await closed;
  }
}

describe("retries", () => {
  /** Counts the attempts the client makes (an interceptor sees each one). */
  function counted(target: string, retries: number) {
    const counter = { attempts: 0 };
    const interceptor: Interceptor = (next) => (request) => {
      counter.attempts += 1;
      return next(request);
    };
    return { sdk: client(target, { retries, interceptors: [interceptor] }), counter };
  }

  test("a call whose first connections are dropped succeeds on a retry", async () => {
    const proxy = await TcpProxy.start(TARGET, 2);
    try {
      const { sdk, counter } = counted(proxy.target, 3);
      const response = await sdk.rerank("q", ["d"]);
      assert.equal(response.results.length, 1);
      assert.equal(proxy.connections, 3); // two dropped, the third served
      assert.ok(counter.attempts >= 2, `${counter.attempts} attempts`);
    } finally {
      await proxy.close();
    }
  });

  for (const retries of [0, 1, 3]) {
    test(`retries: ${retries} makes ${retries + 1} attempts, then UnavailableError`, async () => {
      const proxy = await TcpProxy.start(TARGET, 100);
      try {
        const { sdk, counter } = counted(proxy.target, retries);
        const error = await failure(() => (retries === 1 ? sdk.modelInfo() : sdk.rerank("q", ["d"])));
        assert.ok(error instanceof UnavailableError, String(error));
        assert.equal(counter.attempts, retries + 1);
      } finally {
        await proxy.close();
      }
    });
  }

  test("close() or the caller's signal, with any reason, ends a pause between retries: CancelledError", async () => {
    const proxy = await TcpProxy.start(TARGET, 100);
    try {
      for (const stop of ["close", "abort"] as const) {
        const aborter = new AbortController();
        const sdk = client(proxy.target, { retries: 4 });
        const started = Date.now();
        setTimeout(() => (stop === "close" ? sdk.close() : aborter.abort(new Error("stop"))), 150);
        const error = await failure(() => sdk.rerank("q", ["d"], { signal: aborter.signal }));
        assert.ok(error instanceof CancelledError && error.code === Code.Canceled, `${stop}: ${String(error)}`);
        assert.ok(Date.now() - started < 1000, `${stop}: ${Date.now() - started} ms`); // not after every attempt
      }
    } finally {
      await proxy.close();
    }
  });

  test("the backoff doubles from 100 ms up to 2 s, jittered between half and all of it", () => {
    for (const [retry, ceiling] of [
      [1, 100],
      [2, 200],
      [5, 1600],
      [6, 2000],
      [30, 2000],
    ] as const) {
      for (let i = 0; i < 50; i++) {
        const pause = backoffMs(retry);
        assert.ok(pause >= ceiling / 2 && pause <= ceiling, `${retry}: ${pause}`);
      }
    }
  });
});

test("a closed client refuses calls; `using` closes it", async () => {
  let escaped: RerankClient;
  {
    using scoped = new RerankClient(TARGET);
    assert.equal((await scoped.modelInfo()).maxLength > 0, true);
    escaped = scoped;
  }
  const error = await failure(() => escaped.rerank("q", ["d"]));
  assert.ok(error instanceof CancelledError && error.code === Code.Canceled, String(error));
});

/**
 * A check for assert.throws/rejects: the caller's InvalidRequestError (INVALID_ARGUMENT) with one field
 * violation naming `field`, its description matching `description`, as the Python SDK raises it.
 */
function refusedField(field: string, description: RegExp = /lone surrogate/) {
  return (error: unknown) => {
    assert.ok(error instanceof InvalidRequestError, `${field}: ${String(error)}`);
    assert.equal(error.code, Code.InvalidArgument);
    assert.deepEqual(
      error.fieldViolations.map((v) => v.field),
      [field],
    );
    assert.match(error.fieldViolations[0]!.description, description);
    assert.equal(error.message, `INVALID_ARGUMENT: ${field}: ${error.fieldViolations[0]!.description}`);
    return true;
  };
}

const LONE_SURROGATE = /^holds a lone surrogate, which UTF-8 cannot carry$/;

test("request building refuses a bare string, an unknown truncation name and text UTF-8 cannot carry", () => {
  assert.throws(() => buildRerankRequest("q", "not an array" as unknown as string[]), TypeError);
  assert.throws(() => truncationValue("middle" as "end"), RangeError);
  // A lone surrogate would travel as U+FFFD: another text (or model, or id) than the caller's.
  assert.throws(() => buildRerankRequest("q", ["fine", "lone \ud800"]), refusedField("documents[1]", LONE_SURROGATE));
  assert.throws(() => buildRerankRequest("\udc00", ["a"]), refusedField("query"));
  assert.throws(() => buildScoreRequest([["q", "\ud800"]]), refusedField("pairs[0].text_b"));
  assert.throws(() => buildRerankRequest("q", ["a"], { model: "m\ud800" }), refusedField("model"));
  assert.throws(() => buildScoreRequest([["q", "d"]], { model: "\udc00" }), refusedField("model"));
  assert.throws(() => streamRequest("\ud800", "q", ["a"]), refusedField("id"));
  assert.equal(buildRerankRequest("q", ["emoji 🚀 paired"]).documents[0], "emoji 🚀 paired");
  const request = buildRerankRequest("q", ["a", "b"], { topN: 1, truncation: "chunk", chunkOverlap: 0 });
  assert.equal(request.topN, 1);
  assert.equal(request.chunkOverlap, 0); // set, not the server's default
  assert.equal(buildRerankRequest("q", ["a"]).chunkOverlap, undefined);
});

// -- priority and the token ------------------------------------------------------------------------------

test("priority: passed through; one the uint32 field cannot hold is an InvalidRequestError before sending", async () => {
  assert.equal(buildRerankRequest("q", ["a"]).priority, 0);
  assert.equal(buildRerankRequest("q", ["a"], { priority: 3 }).priority, 3);
  assert.equal(buildScoreRequest([["q", "d"]], { priority: 2 ** 32 - 1 }).priority, 2 ** 32 - 1);
  assert.equal(streamRequest("s", "q", ["a"], { priority: 5 }).request?.priority, 5);
  for (const [bad, shown] of [
    [-1, "-1"],
    [1.5, "1.5"],
    [2 ** 32, "4294967296"],
    [Number.NaN, "NaN"],
    [Number.POSITIVE_INFINITY, "Infinity"],
    ["1" as unknown as number, '"1"'],
  ] as const) {
    const refused = refusedField("priority", new RegExp(`^must be an integer from 0 to 4294967295, got ${shown}$`));
    assert.throws(() => buildRerankRequest("q", ["a"], { priority: bad }), refused, String(bad));
    assert.throws(() => buildScoreRequest([["q", "d"]], { priority: bad }), refused, String(bad));
    assert.throws(() => streamRequest("s", "q", ["a"], { priority: bad }), refused, String(bad));
  }
  // Refused before sending: nothing listens at this target, and a call would be UnavailableError.
  const offline = client("127.0.0.1:1", { retries: 0 });
  await assert.rejects(offline.rerank("q", ["a"], { priority: -1 }), refusedField("priority", /got -1$/));
  await assert.rejects(offline.score([["q", "d"]], { priority: 0.5 }), refusedField("priority", /got 0\.5$/));
  // A stream message built unchecked (as create() would build it) ends the stream with the error naming it.
  const bad = streamRequest("b", "q", ["d"]);
  bad.request!.priority = -2;
  await assert.rejects(
    async () => {
      for await (const _ of client().rerankStream([streamRequest("a", "q", ["d"]), bad])) {
        // the first message's answer may come
      }
    },
    refusedField("requests[1].request.priority", /^must be an integer/),
  );

  // Against the server: a background call (above 0) is answered as one at 0.
  const sdk = client();
  const documents = ["Beijing", "The weather is nice today", "Shanghai"];
  const ranked = (response: RerankResponse) => response.results.map((r) => [r.index, r.logit]);
  const first = await sdk.rerank("what is the capital of China?", documents, { priority: 0 });
  const background = await sdk.rerank("what is the capital of China?", documents, { priority: 1 });
  assert.deepEqual(ranked(background), ranked(first));
  const pairs = documents.map((d) => ["what is the capital of China?", d] as const);
  const logits = (response: ScoreResponse) => response.scores.map((s) => s.logit);
  assert.deepEqual(logits(await sdk.score(pairs, { priority: 7 })), logits(await sdk.score(pairs)));
  for await (const answer of sdk.rerankStream([streamRequest("p", "what is the capital of China?", documents, { priority: 3 })])) {
    assert.equal(answer.outcome.case, "response");
    assert.deepEqual(ranked(answer.outcome.value as RerankResponse), ranked(first));
  }
});

test("topN, maxLength, chunkOverlap the uint32 field cannot hold: a RangeError before sending (Python: ValueError), not a ServerError", async () => {
  assert.equal(buildRerankRequest("q", ["a"], { topN: 2 ** 32 - 1, maxLength: 0, chunkOverlap: 0 }).chunkOverlap, 0);
  for (const [bad, shown] of [
    [-1, "-1"],
    [1.5, "1.5"],
    [2 ** 32, "4294967296"],
    [Number.NaN, "NaN"],
    ["1" as unknown as number, '"1"'],
  ] as const) {
    const message = (field: string) => new RegExp(`^${field} must be an integer from 0 to 4294967295, got ${shown}$`);
    assert.throws(() => buildRerankRequest("q", ["a"], { topN: bad }), { name: "RangeError", message: message("topN") });
    assert.throws(() => buildRerankRequest("q", ["a"], { maxLength: bad }), { name: "RangeError", message: message("maxLength") });
    assert.throws(() => buildScoreRequest([["q", "d"]], { chunkOverlap: bad }), { name: "RangeError", message: message("chunkOverlap") });
    assert.throws(() => streamRequest("s", "q", ["a"], { topN: bad }), { name: "RangeError", message: message("topN") });
  }
  // Refused before sending (nothing listens at this target: a call would be UnavailableError), as the promise's rejection.
  const offline = client("127.0.0.1:1", { retries: 0 });
  await assert.rejects(offline.rerank("q", ["a"], { topN: -1 }), { name: "RangeError", message: /^topN must be .* got -1$/ });
  await assert.rejects(offline.score([["q", "d"]], { maxLength: 0.5 }), { name: "RangeError", message: /^maxLength .* got 0\.5$/ });
  // A stream message built unchecked ends the stream with the error naming it; the server is never asked.
  const bad = streamRequest("b", "q", ["d"]);
  bad.request!.topN = -2;
  await assert.rejects(
    async () => {
      for await (const _ of client().rerankStream([streamRequest("a", "q", ["d"]), bad])) {
        // the first message's answer may come
      }
    },
    { name: "RangeError", message: /^requests\[1\]\.request\.topN must be an integer from 0 to 4294967295, got -2$/ },
  );
});

test("a token a gRPC header cannot carry is a TypeError from the constructor, without the token", () => {
  for (const [token, position] of [
    ["s3cret\n", 6],
    ["s3\tcret", 2],
    ["caf\u00e9-s3cret", 3],
    ["\ud800s3cret", 0],
    ["🚀s3cret", 0],
  ] as const) {
    assert.throws(
      () => new RerankClient(TARGET, { token }),
      (error: unknown) => {
        assert.ok(error instanceof TypeError, String(error));
        assert.ok(error.message.startsWith(`token: the character at position ${position} cannot be sent`), error.message);
        assert.ok(!error.message.includes("s3cret"), error.message);
        return true;
      },
    );
  }
  for (const token of ["s3cret", "a b~!", ""]) {
    new RerankClient(TARGET, { token }).close();
  }
});

// -- the request id --------------------------------------------------------------------------------------

test("a request id the server would not use as given is an InvalidRequestError before sending", async () => {
  // Nothing listens at this target: a call that were sent would be UnavailableError.
  const offline = client("127.0.0.1:1", { retries: 0 });
  for (const [bad, why] of [
    ["id\n", /^the character at position 2 cannot be sent/],
    ["caf\u00e9", /^the character at position 3 cannot be sent/],
    ["🚀".repeat(129), /^is 129 characters long; at most 128 are sent$/],
    [7 as unknown as string, /^must be a string, not number$/],
  ] as const) {
    const refused = refusedField("request_id", why);
    await assert.rejects(offline.rerank("q", ["a"], { requestId: bad }), refused);
    await assert.rejects(offline.score([["q", "d"]], { requestId: bad }), refused);
    await assert.rejects(offline.modelInfo({ requestId: bad }), refused);
    await assert.rejects(offline.listModels({ requestId: bad }), refused);
    await assert.rejects(async () => {
      for await (const _ of offline.rerankStream([], { requestId: bad })) {
        // refused before the stream opens
      }
    }, refused);
  }
  // 128 visible ASCII characters and spaces are sent (and fail to connect: no id came back).
  const unsent = await failure(() => offline.listModels({ requestId: "a b~".repeat(32) }));
  assert.ok(unsent instanceof UnavailableError, String(unsent));
  assert.equal(unsent.requestId, undefined);
});

test("the request id reaches the server, and its errors carry the id it used", async () => {
  const sdk = client();
  assert.equal((await sdk.rerank("q", ["d"], { requestId: "mine-ok" })).results.length, 1);
  const invalid = await failure(() => sdk.rerank("", ["d"], { requestId: "mine-1" }));
  assert.ok(invalid instanceof InvalidRequestError, String(invalid));
  assert.equal(invalid.requestId, "mine-1");
  const notFound = await failure(() => sdk.modelInfo({ model: "no-such-model", requestId: "mine 2" }));
  assert.ok(notFound instanceof ModelNotFoundError, String(notFound));
  assert.equal(notFound.requestId, "mine 2");
  // Without one, the server's own id.
  const generated = await failure(() => sdk.score([["q", "d"]], { model: "no-such-model" }));
  assert.match(generated.requestId ?? "", /^[0-9a-f]{32}$/);
  // A stream's id is set at open; its deadline passing (on the client's side) still carries it.
  async function* slow(): AsyncIterable<RerankStreamRequest> {
    yield streamRequest("a", "q", ["d"]);
    await new Promise((resolve) => setTimeout(resolve, 3_000));
  }
  const timedOut = await failure(async () => {
    for await (const _ of sdk.rerankStream(slow(), { timeoutMs: 1_000, requestId: "stream-1" })) {
      // the first answer may come
    }
  });
  assert.ok(timedOut instanceof RerankTimeoutError, String(timedOut));
  assert.equal(timedOut.requestId, "stream-1");
});

test("modelInfo takes `model: undefined` (an unset environment variable, under exactOptionalPropertyTypes) as the default model", async () => {
  const sdk = client();
  // This suite is type-checked with exactOptionalPropertyTypes: a `model?: string` field would not compile here.
  const unset: string | undefined = process.env.RERANK_SDK_UNSET_MODEL_FOR_THIS_TEST;
  assert.equal(unset, undefined);
  const named = await sdk.modelInfo({ model: unset, timeoutMs: undefined, requestId: undefined });
  assert.deepEqual(named, await sdk.modelInfo());
});

// -- every failure of a call is its promise's rejection, never a throw at the call ------------------------

test("rerank, score, modelInfo and listModels reject their promise on a refused argument or a closed client", async () => {
  const sdk = client();
  const closed = new RerankClient(TARGET);
  closed.close();
  const calls: [string, () => Promise<unknown>, new (...args: never[]) => Error, RegExp][] = [
    ["rerank, a lone surrogate", () => sdk.rerank("\ud800", ["x"]), InvalidRequestError, /^INVALID_ARGUMENT: query: holds a lone/],
    ["score, a lone surrogate", () => sdk.score([["\ud800", "x"]]), InvalidRequestError, /: pairs\[0\]\.text_a: holds/],
    ["rerank, the model", () => sdk.rerank("q", ["x"], { model: "m\udc00" }), InvalidRequestError, /: model: holds/],
    ["score, the model", () => sdk.score([["q", "x"]], { model: "\ud800" }), InvalidRequestError, /: model: holds/],
    ["modelInfo, the model", () => sdk.modelInfo({ model: "\ud800" }), InvalidRequestError, /: model: holds/],
    ["rerank, a priority", () => sdk.rerank("q", ["x"], { priority: -1 }), InvalidRequestError, /: priority: must be/],
    ["rerank, a bare string", () => sdk.rerank("q", "x" as unknown as string[]), TypeError, /single string/],
    ["score, no pairs", () => sdk.score(undefined as unknown as [string, string][]), TypeError, /./],
    ["rerank, a truncation", () => sdk.rerank("q", ["x"], { truncation: "middle" as "end" }), RangeError, /truncation/],
    ["listModels, closed", () => closed.listModels(), CancelledError, /closed/],
    ["modelInfo, closed", () => closed.modelInfo(), CancelledError, /closed/],
  ];
  for (const [what, call, kind, message] of calls) {
    let promise: Promise<unknown> | undefined;
    assert.doesNotThrow(() => {
      promise = call();
    }, what);
    assert.ok(promise instanceof Promise, what);
    let onError: unknown;
    await promise.then(
      () => assert.fail(`${what}: resolved`),
      (error: unknown) => (onError = error),
    );
    assert.ok(onError instanceof kind, `${what}: ${String(onError)}`);
    assert.match(onError.message, message, what);
  }
});

test("rerankStream: a message with a lone surrogate fails the iteration with an InvalidRequestError naming it", async () => {
  const sdk = client();
  for (const [spoil, field] of [
    [(m: RerankStreamRequest) => (m.request!.documents[1] = "lone \ud800"), "requests[1].request.documents[1]"],
    [(m: RerankStreamRequest) => (m.id = "\udc00"), "requests[1].id"],
    [(m: RerankStreamRequest) => (m.request!.model = "\ud800"), "requests[1].request.model"],
  ] as const) {
    // Built unchecked (as create() would build it), after streamRequest's own checks.
    const bad = streamRequest("b", "q", ["fine", "fine too"]);
    spoil(bad);
    const answers: string[] = [];
    const iteration = async () => {
      for await (const answer of sdk.rerankStream([streamRequest("a", "q", ["d"]), bad, streamRequest("c", "q", ["d"])])) {
        answers.push(answer.id);
      }
    };
    await assert.rejects(iteration, refusedField(field));
    assert.ok(!answers.includes("b") && !answers.includes("c"), answers.join());
  }
  // A message the caller's own iterable fails to build: its error, not the call's.
  async function* built() {
    yield streamRequest("a", "q", ["d"]);
    yield streamRequest("b", "\ud800", ["d"]);
  }
  await assert.rejects(async () => {
    for await (const _ of sdk.rerankStream(built())) {
      // answers to the messages before it may come
    }
  }, refusedField("query"));
  // The client goes on.
  assert.equal((await sdk.rerank("q", ["d"])).results.length, 1);
});

test("rerankStream: the caller's signal, with any reason, ends the stream with CancelledError; the client goes on", async () => {
  const sdk = client();
  for (const reason of [undefined, new Error("stop"), "stop"]) {
    const aborter = new AbortController();
    async function* endless() {
      for (let i = 0; ; i++) {
        yield streamRequest(`m${i}`, "q", ["d"]);
        await new Promise((resolve) => setTimeout(resolve, 20));
      }
    }
    const error = await failure(async () => {
      for await (const _ of sdk.rerankStream(endless(), { signal: aborter.signal })) {
        aborter.abort(reason);
      }
    });
    assert.ok(error instanceof CancelledError && error.code === Code.Canceled, `${String(reason)}: ${String(error)}`);
  }
  assert.equal((await sdk.rerank("q", ["d"])).results.length, 1);
});

// -- targets: host:port, URLs, and the gRPC names of one address ------------------------------------------

test("a gRPC target for one address (dns:///, dns:, ipv4:) reaches the server; one the transport cannot use is a TypeError", async () => {
  const [host, port] = [TARGET.slice(0, TARGET.lastIndexOf(":")), TARGET.slice(TARGET.lastIndexOf(":") + 1)];
  assert.match(host, /^\d+\.\d+\.\d+\.\d+$/, "the plaintext frontend listens on an IPv4 address");
  for (const target of [`dns:///${TARGET}`, `dns:${TARGET}`, `ipv4:${TARGET}`, `ipv4:///${TARGET}`, `http://${TARGET}`]) {
    const sdk = client(target, { retries: 0 });
    assert.equal(sdk.target, target);
    assert.equal((await sdk.rerank("q", ["d"])).results.length, 1, target);
  }
  // Built, not called: nothing listens there.
  for (const target of ["dns:///localhost:1", "ipv6:[::1]:1", "ipv6:::1", "passthrough:///localhost:1", "[::1]:1", "rerank.internal:50051"]) {
    new RerankClient(target).close();
  }
  const credentials = tlsCredentials();
  for (const [target, options, message] of [
    ["unix:///tmp/rerank.sock", {}, /the unix: scheme is not supported/],
    ["unix:rerank.sock", {}, /the unix: scheme is not supported/],
    ["xds:///rerank", {}, /the xds: scheme is not supported/],
    ["grpc://localhost:50051", {}, /the grpc: scheme is not supported/],
    ["dns://8.8.8.8/localhost:50051", {}, /a dns authority \(a DNS server\) is not supported/],
    [`dns://${TARGET}`, {}, /a dns authority/],
    [`ipv4:${TARGET},127.0.0.1:${port}`, {}, /one address is needed/],
    ["dns:///", {}, /one address is needed/],
    ["local host:50051", {}, /is not an address/],
    // TLS credentials with an http:// URL would be ignored, and the token sent in clear.
    [`http://${TARGET}`, { credentials }, /credentials given but the target is http:\/\//],
    [`http://${TARGET}`, { credentials, token: "s3cret" }, /credentials given but the target is http:\/\//],
  ] as const) {
    assert.throws(
      () => new RerankClient(target, options),
      (error: unknown) => {
        assert.ok(error instanceof TypeError, `${target}: ${String(error)}`);
        assert.ok(error.message.startsWith(`target ${JSON.stringify(target)}`), error.message);
        assert.match(error.message, message);
        assert.ok(!error.message.includes("s3cret"), error.message);
        return true;
      },
    );
  }
});
