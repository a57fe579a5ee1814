/**
 * Typed SDK for the rerank.v1 gRPC service.
 *
 *     import { RerankClient } from "@rerank-service/client";
 *
 *     const client = new RerankClient("localhost:50051");
 *     const response = await client.rerank("what is the capital of China?", ["Beijing", "The weather is nice today"]);
 *     for (const result of response.results) console.log(result.index, result.score);
 *     client.close();
 *
 * Results are the generated rerank.v1 messages, re-exported here.
 */

export {
  backoffMs,
  buildRerankRequest,
  buildScoreRequest,
  type CallSettings,
  type ClientOptions,
  DEFAULT_MAX_MESSAGE_BYTES,
  DEFAULT_RETRIES,
  DEFAULT_TIMEOUT_MS,
  type ModelInfoOptions,
  RerankClient,
  type RequestOptions,
  type RerankOptions,
  streamRequest,
  type TlsCredentials,
  type TlsFiles,
  tlsCredentials,
  type TruncationArg,
  truncationValue,
} from "./client.js";
export {
  AuthenticationError,
  CancelledError,
  fromConnectError,
  fromStreamError,
  InvalidRequestError,
  ModelNotFoundError,
  RerankError,
  type RerankErrorOptions,
  RerankTimeoutError,
  ResourceExhaustedError,
  ServerError,
  statusName,
  UnavailableError,
} from "./errors.js";
export * from "./gen/rerank/v1/rerank_pb.js";
export { Code, type Interceptor } from "@connectrpc/connect";
