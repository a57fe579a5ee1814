/**
 * RerankClient: the generated rerank.v1 service over a gRPC (HTTP/2) transport, with a default deadline on
 * every call, retries on UNAVAILABLE, TLS, a bearer token, and the errors of ./errors.ts instead of
 * ConnectError. It mirrors the Python SDK's RerankClient (camelCase names, the same error tree).
 */

import { setMaxListeners } from "node:events";
import { readFileSync } from "node:fs";
import type { ClientHttp2Session, ClientHttp2Stream } from "node:http2";

import { create } from "@bufbuild/protobuf";
import { type CallOptions, type Client, Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";

import {
  CancelledError,
  fromConnectError,
  InvalidRequestError,
  type RerankError,
  REQUEST_ID_HEADER,
  RerankTimeoutError,
  UnavailableError,
} from "./errors.js";
import {
  FieldViolationSchema,
  type GetModelInfoResponse,
  type ListModelsResponse,
  type RerankRequest,
  RerankRequestSchema,
  type RerankResponse,
  RerankService,
  type RerankStreamRequest,
  RerankStreamRequestSchema,
  type RerankStreamResponse,
  type ScoreRequest,
  ScoreRequestSchema,
  type ScoreResponse,
  TextPairSchema,
  Truncation,
} from "./gen/rerank/v1/rerank_pb.js";

/** Every call's deadline unless the client or the call sets another. */
export const DEFAULT_TIMEOUT_MS = 30_000;
/** Rerank requests carry whole documents; gRPC's 4 MiB default is too small for 1,000 long ones. */
export const DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024;
/** How often an idempotent call (every unary one) is retried on UNAVAILABLE. */
export const DEFAULT_RETRIES = 3;
/** How often the connection is pinged, idle or not: a replica gone without a FIN is found within ~40 s. */
export const DEFAULT_KEEPALIVE_MS = 30_000;
// The server answers pings more often than every 10 s with GOAWAY (too_many_pings).
const MIN_KEEPALIVE_MS = 10_000;
// gRPC caps a call's attempts at 5; the SDKs keep that cap.
const MAX_ATTEMPTS = 5;
const INITIAL_BACKOFF_MS = 100;
const MAX_BACKOFF_MS = 2_000;
// The longest delay a Node timer holds (2^31 - 1 ms, about 24.8 days); a longer one fires after 1 ms.
const MAX_TIMER_MS = 2 ** 31 - 1;

/** A Truncation value (e.g. Truncation.CHUNK), its name ("end", "start", "none", "chunk") or undefined (the default). */
export type TruncationArg = Truncation | "end" | "start" | "none" | "chunk";

const TRUNCATION_NAMES: Record<string, Truncation> = {
  end: Truncation.END,
  none: Truncation.NONE,
  chunk: Truncation.CHUNK,
  start: Truncation.START,
};

/** The enum value for a Truncation value, a name ("end", "start", "none", "chunk") or undefined (the default). */
export function truncationValue(truncation: TruncationArg | undefined): Truncation {
  if (truncation === undefined) {
    return Truncation.UNSPECIFIED;
  }
  if (typeof truncation === "string") {
    const value = TRUNCATION_NAMES[truncation.toLowerCase()];
    if (value === undefined) {
      throw new RangeError(`truncation must be one of end, start, none, chunk; got ${JSON.stringify(truncation)}`);
    }
    return value;
  }
  return truncation;
}

/**
 * A call's own deadline (null: none; undefined: the client's), an AbortSignal that cancels it, and its
 * request id.
 */
export interface CallSettings {
  timeoutMs?: number | null | undefined;
  signal?: AbortSignal | undefined;
  /**
   * Sent as `x-request-id` (for rerankStream, once for the whole stream; a retry resends the same one): the
   * id the server logs the call under, to find it from the caller's own logs. Up to 128 visible ASCII
   * characters and spaces, which the server uses as given; another value is an InvalidRequestError naming
   * `request_id`, before sending. "" or unset: the server makes its own id. Every RerankError from the
   * server carries the id it used as `requestId`.
   */
  requestId?: string | undefined;
}

/**
 * What Rerank and Score requests share. The names are the request fields' own, and they pass through to
 * the request as they are: a field added to both messages is one line here. Every optional field takes
 * undefined too (unset), so that `model: process.env.RERANK_MODEL` type-checks under exactOptionalPropertyTypes.
 */
export interface RequestOptions {
  /** What to do with pairs longer than maxLength (default: "end"). */
  truncation?: TruncationArg | undefined;
  /** Tokens per pair, special tokens included; 0 or unset: the model's limit. */
  maxLength?: number | undefined;
  /** Tokens shared by consecutive windows with "chunk" truncation; unset: the server's default. */
  chunkOverlap?: number | undefined;
  /** The served model to use (its name, as listModels lists it); unset: the server's default. */
  model?: string | undefined;
  /**
   * Lower is handled first; 0 or unset (the default) first of all. Above 0 (background work such as
   * re-indexing) the call is refused first under load and queued behind calls at 0. An integer from 0 to
   * 2^32 - 1; another value is an InvalidRequestError before anything is sent.
   */
  priority?: number | undefined;
}

export interface RerankOptions extends RequestOptions {
  /** How many of the best results to return; 0 or unset: all of them, best first. */
  topN?: number | undefined;
  /** Echo each result's document. */
  returnDocuments?: boolean | undefined;
}

/**
 * What modelInfo takes besides its CallSettings. `model` takes undefined too (unset), as RequestOptions'
 * does, so that `model: process.env.RERANK_MODEL` type-checks under exactOptionalPropertyTypes.
 */
export interface ModelInfoOptions {
  /** The served model to describe (its name, as listModels lists it); unset: the server's default. */
  model?: string | undefined;
}

/**
 * The caller's InvalidRequestError naming `field`, thrown before anything is sent: what the server
 * answers for a request it refuses, and what the Python SDK raises for these arguments.
 */
function refused(field: string, description: string): InvalidRequestError {
  const violation = create(FieldViolationSchema, { field, description });
  return new InvalidRequestError(Code.InvalidArgument, `${field}: ${description}`, [violation]);
}

// A UTF-16 surrogate that is not half of a pair (with the u flag, pairs match as one code point).
const LONE_SURROGATE = /\p{Surrogate}/u;

/**
 * Refuse text that UTF-8 cannot carry: protobuf would send a lone surrogate as U+FFFD, and the server
 * would score (and echo) another text than the caller's, or look up another model.
 */
function checkText(field: string, text: string | undefined): void {
  if (text !== undefined && LONE_SURROGATE.test(text)) {
    throw refused(field, "holds a lone surrogate, which UTF-8 cannot carry");
  }
}

/** The most a uint32 field (the requests' priority) holds. */
const UINT32_MAX = 2 ** 32 - 1;

/** Refuse a priority the request's uint32 field cannot hold (negative, fractional, too large, not a number). */
function checkPriority(field: string, priority: number | undefined): void {
  if (priority !== undefined && !(Number.isInteger(priority) && priority >= 0 && priority <= UINT32_MAX)) {
    const shown = typeof priority === "string" ? JSON.stringify(priority) : String(priority);
    throw refused(field, `must be an integer from 0 to ${UINT32_MAX}, got ${shown}`);
  }
}

// The uint32 counts of the requests besides priority, by their option names.
interface RequestCounts {
  topN?: number | undefined;
  maxLength?: number | undefined;
  chunkOverlap?: number | undefined;
}

/**
 * Refuse a count (topN, maxLength, chunkOverlap) its uint32 field cannot hold (negative, fractional, too
 * large, not a number) with a RangeError before anything is sent, as the Python SDK raises protobuf's
 * ValueError ("Value out of range") or TypeError for it: protobuf-es would keep it, fail to encode it while
 * sending, and the call would read as the server's INTERNAL error (a ServerError). `prefix` leads each name.
 */
function checkCounts(counts: RequestCounts, prefix = ""): void {
  for (const name of ["topN", "maxLength", "chunkOverlap"] as const) {
    const value = counts[name];
    if (value !== undefined && !(Number.isInteger(value) && value >= 0 && value <= UINT32_MAX)) {
      const shown = typeof value === "string" ? JSON.stringify(value) : String(value);
      throw new RangeError(`${prefix}${name} must be an integer from 0 to ${UINT32_MAX}, got ${shown}`);
    }
  }
}

// The checked fields of a RerankRequest, as a message or as the plain object connect also takes.
interface RerankRequestText extends RequestCounts {
  query?: string;
  documents?: readonly string[];
  model?: string;
  priority?: number;
}

/**
 * checkText on every string of a RerankRequest, checkPriority and checkCounts; `prefix` leads each
 * field's name.
 */
function checkRerankRequest(request: RerankRequestText, prefix = ""): void {
  checkText(`${prefix}query`, request.query);
  request.documents?.forEach((document, i) => checkText(`${prefix}documents[${i}]`, document));
  checkText(`${prefix}model`, request.model);
  checkPriority(`${prefix}priority`, request.priority);
  checkCounts(request, prefix);
}

/** checkText on every string of a RerankStream message; `field` names the message ("requests[3]"). */
function checkStreamRequest(message: { id?: string; request?: RerankRequestText }, field: string): void {
  checkText(`${field}.id`, message.id);
  if (message.request !== undefined) {
    checkRerankRequest(message.request, `${field}.request.`);
  }
}

/**
 * The RerankRequest for these arguments. Validation of the values is the server's job, but for text UTF-8
 * cannot carry and a priority its field cannot hold (an InvalidRequestError naming the field).
 */
export function buildRerankRequest(query: string, documents: readonly string[], options: RerankOptions = {}): RerankRequest {
  if (typeof documents === "string") {
    // A string is iterable too; a caller without types would rerank its characters.
    throw new TypeError("documents must be an array of strings, not a single string");
  }
  // Before create(), which would keep a fractional or negative number as it is, for sending to fail on.
  checkPriority("priority", options.priority);
  checkCounts(options);
  const { truncation, ...fields } = options;
  const request = create(RerankRequestSchema, {
    ...fields,
    query,
    documents: [...documents],
    truncation: truncationValue(truncation),
  });
  checkRerankRequest(request);
  return request;
}

/** The ScoreRequest for (textA, textB) pairs. */
export function buildScoreRequest(pairs: Iterable<readonly [string, string]>, options: RequestOptions = {}): ScoreRequest {
  checkPriority("priority", options.priority);
  checkCounts(options);
  const { truncation, ...fields } = options;
  const request = create(ScoreRequestSchema, {
    ...fields,
    pairs: Array.from(pairs, ([textA, textB], i) => {
      // The wire names, as the server's field violations and the other SDKs give them.
      checkText(`pairs[${i}].text_a`, textA);
      checkText(`pairs[${i}].text_b`, textB);
      return create(TextPairSchema, { textA, textB });
    }),
    truncation: truncationValue(truncation),
  });
  checkText("model", request.model);
  return request;
}

/** One RerankStream message: an id of your choice and the arguments of `rerank`. */
export function streamRequest(
  id: string,
  query: string,
  documents: readonly string[],
  options: RerankOptions = {},
): RerankStreamRequest {
  checkText("id", id);
  return create(RerankStreamRequestSchema, { id, request: buildRerankRequest(query, documents, options) });
}

/** PEM files for TLS: the CA to trust (default: Node's), and for mTLS the client's chain and key. */
export interface TlsFiles {
  rootCertificates?: string | undefined;
  certificateChain?: string | undefined;
  privateKey?: string | undefined;
}

/** TLS credentials, the PEM contents themselves. */
export interface TlsCredentials {
  ca?: Buffer | undefined;
  cert?: Buffer | undefined;
  key?: Buffer | undefined;
}

/** TLS credentials from PEM files (see TlsFiles). */
export function tlsCredentials(files: TlsFiles = {}): TlsCredentials {
  const read = (path: string | undefined) => (path === undefined ? undefined : readFileSync(path));
  return { ca: read(files.rootCertificates), cert: read(files.certificateChain), key: read(files.privateKey) };
}

/**
 * The client's settings. Every field takes undefined too (the default), so that settings read from the
 * environment (`token: process.env.RERANK_TOKEN`) type-check under exactOptionalPropertyTypes.
 */
export interface ClientOptions {
  /**
   * The default deadline of every call in ms (null: none); for rerankStream, of the whole stream. One past
   * 2^31 - 1 ms (24.8 days, the longest a Node timer holds; Infinity included) is cut to that.
   */
  timeoutMs?: number | null | undefined;
  /** Turns on TLS (see tlsCredentials); the target must not be an http:// URL then. */
  credentials?: TlsCredentials | undefined;
  /**
   * Sent as `authorization: Bearer <token>` with every call, over plaintext too (as the other SDKs do: use
   * TLS anywhere but a trusted network). Visible ASCII and spaces only (what a gRPC header value holds):
   * the constructor throws a TypeError for another character. "" or undefined: none.
   */
  token?: string | undefined;
  /**
   * How often rerank, score, modelInfo and listModels are retried, with backoff, on UNAVAILABLE; at most 4
   * (more counts as 4), 0 or less none. Not an integer (NaN, 2.5): the constructor throws a RangeError.
   */
  retries?: number | undefined;
  /** The largest message sent or received. */
  maxMessageBytes?: number | undefined;
  /**
   * How often the connection is pinged in ms, idle or not (30 000; each ping has 10 s to be answered). The
   * server accepts a ping every 10 s at most: a shorter interval is a RangeError from the constructor.
   */
  keepaliveMs?: number | undefined;
  /** More interceptors (logging, tracing, ...), after the SDK's own. */
  interceptors?: Interceptor[] | undefined;
}

// What a gRPC (HTTP/2) metadata value may not hold: anything but visible ASCII and the space.
const NOT_HEADER_VALUE = /[^\x20-\x7e]/;

/**
 * Refuse a token a header value cannot carry (a newline, a non-ASCII character, a lone surrogate) when the
 * client is made, not as a failure of every call. The message gives the position, never the token.
 */
function checkToken(token: string | undefined): void {
  // Counted in characters (code points), as the Python SDK counts them.
  const position = token === undefined ? -1 : [...token].findIndex((c) => NOT_HEADER_VALUE.test(c));
  if (position >= 0) {
    throw new TypeError(
      `token: the character at position ${position} cannot be sent in a gRPC header (only visible ASCII and spaces can)`,
    );
  }
}

/** The most of a caller's request id the server keeps (it cuts a longer one). */
const REQUEST_ID_MAX = 128;

/**
 * Refuse a request id the server would not use as given (it replaces one outside visible ASCII and cuts one
 * past REQUEST_ID_MAX): the caller's logs would hold another id than the service's.
 */
function checkRequestId(requestId: string | undefined): void {
  if (requestId === undefined) {
    return;
  }
  if (typeof requestId !== "string") {
    throw refused("request_id", `must be a string, not ${typeof requestId}`);
  }
  // Counted in characters (code points), as the Python SDK counts them.
  const characters = [...requestId];
  if (characters.length > REQUEST_ID_MAX) {
    throw refused("request_id", `is ${characters.length} characters long; at most ${REQUEST_ID_MAX} are sent`);
  }
  const position = characters.findIndex((c) => NOT_HEADER_VALUE.test(c));
  if (position >= 0) {
    throw refused(
      "request_id",
      `the character at position ${position} cannot be sent in a gRPC header (only visible ASCII and spaces can)`,
    );
  }
}

// gRPC name schemes (https://github.com/grpc/grpc/blob/master/doc/naming.md): those naming one address
// map to it; the others need a resolver or a socket this transport does not have.
const ONE_ADDRESS_SCHEMES = new Set(["dns", "ipv4", "ipv6", "passthrough"]);
const OTHER_GRPC_SCHEMES = new Set(["unix", "unix-abstract", "vsock", "xds", "google-c2p"]);
const TARGET_HELP = "use host:port, dns:///host:port, ipv4:address:port, ipv6:[address]:port or an http(s):// URL";

/**
 * The base URL of the transport for `target`: `host:port`; an `http://` or `https://` URL; or a gRPC
 * name for one address, `dns:///host:port` (or `dns:host:port`), `ipv4:address:port`,
 * `ipv6:[address]:port`, which connect to host:port. Anything else is a TypeError here rather than a
 * failure of every call: another gRPC scheme (`unix:`, `xds:`), a DNS server (`dns://server/...`),
 * several addresses, TLS credentials with an http:// URL (they would be ignored, and the token sent in clear).
 */
function baseUrlFor(target: string, tls: boolean): string {
  const refuse = (why: string): never => {
    throw new TypeError(`target ${JSON.stringify(target)}: ${why}`);
  };
  const checked = (base: string): string => {
    try {
      new URL(base);
    } catch (error) {
      throw new TypeError(`target ${JSON.stringify(target)} is not an address: ${TARGET_HELP}`, { cause: error });
    }
    return base;
  };
  const url = /^([a-z][a-z0-9+.-]*):\/\//i.exec(target);
  const scheme = (url ?? /^([a-z][a-z0-9+.-]*):/i.exec(target))?.[1]?.toLowerCase();
  if (scheme === "http" || scheme === "https") {
    if (tls && scheme === "http") {
      refuse("credentials given but the target is http://, which would send in plaintext; use https:// or host:port");
    }
    return checked(target);
  }
  let address = target;
  if (scheme !== undefined && ONE_ADDRESS_SCHEMES.has(scheme)) {
    let name = target.slice(scheme.length + 1);
    if (name.startsWith("//")) {
      const slash = name.indexOf("/", 2);
      if (slash !== 2) {
        refuse(`a ${scheme} authority (a DNS server) is not supported; ${TARGET_HELP}`);
      }
      name = name.slice(slash + 1);
    }
    if (name === "" || name.includes(",")) {
      refuse(`one address is needed; ${TARGET_HELP}`);
    }
    address = scheme === "ipv6" && !name.startsWith("[") ? `[${name}]` : name;
  } else if (url !== null || (scheme !== undefined && OTHER_GRPC_SCHEMES.has(scheme))) {
    refuse(`the ${scheme}: scheme is not supported by this SDK's transport; ${TARGET_HELP}`);
  }
  return checked(`${tls ? "https" : "http"}://${address}`);
}

/**
 * The pause before retry number `retry` (1, 2, ...): a random time between half and all of
 * min(100 ms * 2^(retry-1), 2 s).
 */
export function backoffMs(retry: number): number {
  const ceiling = Math.min(INITIAL_BACKOFF_MS * 2 ** (retry - 1), MAX_BACKOFF_MS);
  return ceiling / 2 + Math.random() * (ceiling / 2);
}

/** Wait `ms`, or reject with the reason of the first of `signals` to abort. */
function sleep(ms: number, ...signals: (AbortSignal | undefined)[]): Promise<void> {
  const watched = signals.filter((signal): signal is AbortSignal => signal !== undefined);
  return new Promise((resolve, reject) => {
    const aborted = watched.find((signal) => signal.aborted);
    if (aborted !== undefined) {
      reject(aborted.reason);
      return;
    }
    const stop = () => watched.forEach((signal) => signal.removeEventListener("abort", onAbort));
    const onAbort = (event: Event) => {
      clearTimeout(timer);
      stop();
      reject((event.target as AbortSignal).reason);
    };
    const timer = setTimeout(() => {
      stop();
      resolve();
    }, ms);
    watched.forEach((signal) => signal.addEventListener("abort", onAbort, { once: true }));
  });
}

// Node's codes for a connection that failed under the call: TLS and certificate verification, resets.
const CONNECTION_FAILURE =
  /^(ERR_SSL_|ERR_TLS_|UNABLE_TO_|CERT_|DEPTH_ZERO_SELF_SIGNED_CERT$|SELF_SIGNED_CERT_IN_CHAIN$|ECONNRESET$|EPIPE$)/;

/** The `code` of the Node error (ECONNRESET, ERR_SSL_..., UNABLE_TO_VERIFY_LEAF_SIGNATURE) behind a failure. */
function nodeErrorCode(reason: unknown): string | undefined {
  const cause = reason instanceof ConnectError ? reason.cause : reason;
  const code = (cause as { code?: unknown } | null | undefined)?.code;
  return typeof code === "string" ? code : undefined;
}

// The sessions whose ping guardPing has wrapped.
const GUARDED = new WeakSet<ClientHttp2Session>();

/**
 * Make `session.ping` answer a destroyed session with an error (to its callback) instead of throwing.
 * connect-node 2.1's keepalive can outlive its connection: when close() destroys a session with calls in
 * flight, the manager stops its timers first and the calls' streams close afterwards; the last to close
 * arms the idle ping again, which 30 s later pings the destroyed session, and Node's ERR_HTTP2_INVALID_SESSION,
 * thrown in a timer, ended the process.
 */
function guardPing(session: ClientHttp2Session | undefined): void {
  if (session === undefined || GUARDED.has(session)) {
    return;
  }
  GUARDED.add(session);
  const ping = session.ping.bind(session) as (...args: unknown[]) => boolean;
  session.ping = ((...args: unknown[]): boolean => {
    if (!session.destroyed) {
      return ping(...args);
    }
    const callback = args[args.length - 1];
    if (typeof callback === "function") {
      process.nextTick(callback, new Error("the HTTP/2 session is closed"), 0, Buffer.alloc(8));
    }
    return false;
  }) as ClientHttp2Session["ping"];
}

/** connect-node's session manager, every session it opens a stream on guarded (see guardPing). */
class SessionManager extends Http2SessionManager {
  override async request(...args: Parameters<Http2SessionManager["request"]>): Promise<ClientHttp2Stream> {
    const stream = await super.request(...args);
    guardPing(stream.session as ClientHttp2Session | undefined);
    return stream;
  }
}

/**
 * A client of one rerank service. `target` is `host:port`, a base URL (`https://host:port`) or a gRPC
 * name for one address (`dns:///host:port`, `ipv4:address:port`, `ipv6:[address]:port`); the constructor
 * throws a TypeError for another. Calls share one HTTP/2 connection, opened on the first call. Call
 * close() when done.
 */
export class RerankClient {
  readonly target: string;
  private readonly timeoutMs: number | null;
  private readonly retries: number;
  private readonly session: Http2SessionManager;
  private readonly stub: Client<typeof RerankService>;
  private closed = false;
  // Aborted by close(): ends a pause between retries at once.
  private readonly closing = new AbortController();

  constructor(target: string, options: ClientOptions = {}) {
    checkToken(options.token);
    const tls = options.credentials;
    const baseUrl = baseUrlFor(target, tls !== undefined);
    this.target = target;
    this.timeoutMs = options.timeoutMs === undefined ? DEFAULT_TIMEOUT_MS : options.timeoutMs;
    this.retries = options.retries ?? DEFAULT_RETRIES;
    if (!Number.isInteger(this.retries)) {
      // NaN (`Number(process.env.RETRIES)` unset) would never reach the last attempt: a call would be
      // retried until its deadline, and without one for ever.
      throw new RangeError(`retries must be an integer, got ${String(options.retries)}`);
    }
    // Every call pausing between retries listens to it: no cap on listeners (each is removed after its pause).
    setMaxListeners(0, this.closing.signal);
    const maxBytes = options.maxMessageBytes ?? DEFAULT_MAX_MESSAGE_BYTES;
    const keepaliveMs = options.keepaliveMs ?? DEFAULT_KEEPALIVE_MS;
    if (!(keepaliveMs >= MIN_KEEPALIVE_MS)) {
      throw new RangeError(`keepaliveMs must be at least ${MIN_KEEPALIVE_MS}, got ${String(options.keepaliveMs)}`);
    }
    this.session = new SessionManager(
      baseUrl,
      { pingIntervalMs: keepaliveMs, pingTimeoutMs: 10_000, pingIdleConnection: true },
      tls ? { ca: tls.ca, cert: tls.cert, key: tls.key } : {},
    );
    const interceptors: Interceptor[] = [];
    if (options.token) {
      const authorization = `Bearer ${options.token}`;
      interceptors.push((next) => (request) => {
        request.header.set("authorization", authorization);
        return next(request);
      });
    }
    const transport = createGrpcTransport({
      baseUrl,
      sessionManager: this.session,
      readMaxBytes: maxBytes,
      writeMaxBytes: maxBytes,
      interceptors: [...interceptors, ...(options.interceptors ?? [])],
    });
    this.stub = createClient(RerankService, transport);
  }

  /**
   * Score `documents` against `query`; results come best first. Every failure, a refused argument
   * included, rejects the promise.
   */
  async rerank(
    query: string,
    documents: readonly string[],
    options: RerankOptions & CallSettings = {},
  ): Promise<RerankResponse> {
    const { timeoutMs, signal, requestId, ...fields } = options;
    const request = buildRerankRequest(query, documents, fields);
    return this.call((callOptions) => this.stub.rerank(request, callOptions), { timeoutMs, signal, requestId });
  }

  /** Score [textA, textB] pairs; scores come in request order. Every failure rejects the promise. */
  async score(pairs: Iterable<readonly [string, string]>, options: RequestOptions & CallSettings = {}): Promise<ScoreResponse> {
    const { timeoutMs, signal, requestId, ...fields } = options;
    const request = buildScoreRequest(pairs, fields);
    return this.call((callOptions) => this.stub.score(request, callOptions), { timeoutMs, signal, requestId });
  }

  /** A served model (`model` unset: the default one), its maximum length and the service's limits. */
  async modelInfo(options: ModelInfoOptions & CallSettings = {}): Promise<GetModelInfoResponse> {
    const { model, ...settings } = options;
    checkText("model", model);
    return this.call((callOptions) => this.stub.getModelInfo({ model }, callOptions), settings);
  }

  /** Every served model, and the name of the default one. */
  async listModels(settings: CallSettings = {}): Promise<ListModelsResponse> {
    return this.call((callOptions) => this.stub.listModels({}, callOptions), settings);
  }

  /**
   * Send independent rerank requests (see streamRequest); answers come as they complete. A failed
   * message is answered with `outcome.case === "error"` (fromStreamError turns it into the error the
   * unary call would have thrown); a failure of the stream itself throws. An error of `requests`, or a
   * message the SDK refuses (an InvalidRequestError naming the field: "requests[3].request.query"), ends
   * the stream and is what the iteration throws. Leaving the iteration early (`break`, a throw in the loop)
   * or the caller's `signal` cancels the stream: the server stops its pending work. Streams are not retried.
   */
  async *rerankStream(
    requests: Iterable<RerankStreamRequest> | AsyncIterable<RerankStreamRequest>,
    settings: CallSettings = {},
  ): AsyncIterable<RerankStreamResponse> {
    this.checkOpen();
    checkRequestId(settings.requestId);
    // A message refused here, or an error of `requests` itself, fails the call (connect reads it as
    // INTERNAL); the iteration throws that error. One connect throws in while sending is the call's own.
    let refused: unknown;
    async function* checked(): AsyncIterable<RerankStreamRequest> {
      let index = 0;
      let sending = false;
      try {
        for await (const message of requests) {
          checkStreamRequest(message, `requests[${index++}]`);
          sending = true;
          yield message;
          sending = false;
        }
      } catch (error) {
        if (!sending) {
          refused = error;
        }
        throw error;
      }
    }
    // The server's id, from the stream's headers: an error connect raises itself (the deadline) lacks them.
    let heard: string | undefined;
    const onHeader = (headers: Headers) => {
      heard = headers.get(REQUEST_ID_HEADER) ?? undefined;
    };
    // Aborted when the caller stops reading (a `break`, a throw in its loop): connect's iterable has no
    // return(), and the call would stay open, its requests still sent and the server still answering them
    // until the deadline. Linked to the caller's signal, whatever its reason: connect resets the stream with
    // CANCEL for an abort, and the caller gets a CancelledError.
    const stop = new AbortController();
    const onAbort = () => stop.abort();
    if (settings.signal?.aborted) {
      onAbort();
    }
    settings.signal?.addEventListener("abort", onAbort, { once: true });
    const callOptions = this.callOptions(settings.timeoutMs, { ...settings, signal: stop.signal });
    const responses = this.stub.rerankStream(checked(), { ...callOptions, onHeader })[Symbol.asyncIterator]();
    let ended = false;
    try {
      for (;;) {
        const next = await responses.next();
        if (next.done === true) {
          ended = true;
          break;
        }
        yield next.value;
      }
    } catch (error) {
      ended = true;
      throw refused ?? this.failure(error, settings.signal, heard);
    } finally {
      settings.signal?.removeEventListener("abort", onAbort);
      if (!ended) {
        // Read once more after the abort: connect then fails the call and releases what it holds, its
        // deadline's timer among them, which would keep Node running until the deadline.
        stop.abort();
        responses.next().catch(() => undefined);
      }
    }
    if (refused !== undefined) {
      throw refused;
    }
  }

  /** Close the connection; calls in flight fail with CANCELLED. */
  close(): void {
    this.closed = true;
    this.closing.abort();
    this.session.abort();
  }

  [Symbol.dispose](): void {
    this.close();
  }

  private checkOpen(): void {
    if (this.closed) {
      throw new CancelledError(Code.Canceled, "the client is closed");
    }
  }

  /** connect's options for one attempt: every attempt of a call sends the call's one request id. */
  private callOptions(timeoutMs: number | null | undefined, settings: CallSettings): CallOptions {
    const timeout = timeoutMs === undefined ? this.timeoutMs : timeoutMs;
    const headers: Record<string, string> = settings.requestId ? { [REQUEST_ID_HEADER]: settings.requestId } : {};
    // connect reads a timeout <= 0 as "none"; null is this SDK's "none". Its deadline is a Node timer, which
    // fires after 1 ms for a delay past MAX_TIMER_MS (24.8 days; Infinity included): such a deadline is cut
    // to the longest a timer holds, not made a call that times out at once.
    const ms = timeout === null ? 0 : Math.min(Math.max(timeout, 1), MAX_TIMER_MS);
    return { timeoutMs: ms, signal: settings.signal, headers };
  }

  /**
   * An idempotent unary call (scoring has no side effects), retried on UNAVAILABLE with exponential
   * backoff within its one deadline.
   */
  private async call<T>(invoke: (options: CallOptions) => Promise<T>, settings: CallSettings): Promise<T> {
    this.checkOpen();
    checkRequestId(settings.requestId);
    const timeout = settings.timeoutMs === undefined ? this.timeoutMs : settings.timeoutMs;
    const deadline = timeout === null ? null : Date.now() + timeout;
    const attempts = Math.min(this.retries + 1, MAX_ATTEMPTS);
    for (let attempt = 1; ; attempt++) {
      const remaining = deadline === null ? null : deadline - Date.now();
      if (remaining !== null && remaining <= 0) {
        const when = attempt === 1 ? "before the call" : "between retries";
        throw new RerankTimeoutError(Code.DeadlineExceeded, `the deadline passed ${when}`);
      }
      try {
        return await invoke(this.callOptions(remaining, settings));
      } catch (reason) {
        const error = this.failure(reason, settings.signal);
        if (attempt >= attempts || !(error instanceof UnavailableError)) {
          throw error;
        }
        const pause = backoffMs(attempt);
        if (deadline !== null && deadline - Date.now() <= pause) {
          throw error; // no time left for another attempt: the server is unavailable
        }
        try {
          await sleep(pause, settings.signal, this.closing.signal);
        } catch (aborted) {
          // The caller's signal (whatever its reason) or close(): cancelled, as during an attempt.
          const message = this.closed ? "the client is closed" : "the call was cancelled";
          throw new CancelledError(Code.Canceled, message, [], { cause: aborted });
        }
      }
    }
  }

  /**
   * The RerankError for what a call threw. Node's http2 ends the streams of a connection that went away
   * (a server stopped, a connection reset) with RST_STREAM CANCEL, which connect reads as CANCELLED; when
   * neither the caller nor close() cancelled and no status came from the server, the server is unavailable.
   */
  private failure(reason: unknown, signal: AbortSignal | undefined, requestId?: string): RerankError {
    const error = fromConnectError(reason, requestId);
    const fromServer = reason instanceof ConnectError && reason.metadata.has("grpc-status");
    if (error instanceof CancelledError && !signal?.aborted && !this.closed && !fromServer) {
      return new UnavailableError(Code.Unavailable, error.details, [], { cause: reason, requestId: error.requestId });
    }
    // A TLS handshake that failed, or a connection reset before any answer, is Node's error, which connect
    // reads as INTERNAL or ABORTED; the other SDKs, and retries, see the server as unavailable.
    const transport = CONNECTION_FAILURE.test(nodeErrorCode(reason) ?? "");
    if (transport && !fromServer && !signal?.aborted && !this.closed) {
      return new UnavailableError(Code.Unavailable, error.details, [], { cause: reason, requestId: error.requestId });
    }
    return error;
  }
}
