/**
 * The SDK's error classes: every failed call throws a subclass of RerankError, the same tree as the
 * Python SDK's exceptions.
 *
 * RerankError
 * ├── InvalidRequestError     INVALID_ARGUMENT, OUT_OF_RANGE, FAILED_PRECONDITION
 * ├── ModelNotFoundError      NOT_FOUND (the request names a model the server does not serve)
 * ├── ResourceExhaustedError  RESOURCE_EXHAUSTED (a limit or the server's capacity)
 * ├── RerankTimeoutError      DEADLINE_EXCEEDED
 * ├── UnavailableError        UNAVAILABLE (server down, draining or restarting: safe to retry)
 * ├── AuthenticationError     UNAUTHENTICATED, PERMISSION_DENIED
 * ├── CancelledError          CANCELLED
 * └── ServerError             INTERNAL, UNKNOWN and anything else
 */

import { create, fromBinary } from "@bufbuild/protobuf";
import { BinaryReader, WireType } from "@bufbuild/protobuf/wire";
import { Code, ConnectError } from "@connectrpc/connect";

import { type FieldViolation, FieldViolationSchema, type StreamError } from "./gen/rerank/v1/rerank_pb.js";

/** gRPC's names of its status codes ("INVALID_ARGUMENT"), by number. */
const STATUS_NAMES: Record<number, string> = {
  0: "OK",
  1: "CANCELLED",
  2: "UNKNOWN",
  3: "INVALID_ARGUMENT",
  4: "DEADLINE_EXCEEDED",
  5: "NOT_FOUND",
  6: "ALREADY_EXISTS",
  7: "PERMISSION_DENIED",
  8: "RESOURCE_EXHAUSTED",
  9: "FAILED_PRECONDITION",
  10: "ABORTED",
  11: "OUT_OF_RANGE",
  12: "UNIMPLEMENTED",
  13: "INTERNAL",
  14: "UNAVAILABLE",
  15: "DATA_LOSS",
  16: "UNAUTHENTICATED",
};

/** The gRPC name of a status code, e.g. statusName(Code.InvalidArgument) === "INVALID_ARGUMENT". */
export function statusName(code: Code): string {
  return STATUS_NAMES[code] ?? `CODE(${code})`;
}

/** What a RerankError holds besides its code, message and field violations. */
export interface RerankErrorOptions {
  cause?: unknown;
  requestId?: string | undefined;
}

/**
 * A call to the rerank service failed. `code` is the gRPC status (connect's Code enum has gRPC's numbers),
 * `details` the server's message, and `fieldViolations` the request fields at fault (from the
 * google.rpc.BadRequest the server attaches to request errors). `requestId` is the id the server handled
 * and logged the call under (its `x-request-id`: the caller's `requestId` when valid, else one of its
 * own); undefined when no answer came from the server (a refusal before sending, a connection that
 * failed) and for a stream message's error.
 */
export class RerankError extends Error {
  readonly code: Code;
  readonly details: string;
  readonly fieldViolations: FieldViolation[];
  readonly requestId: string | undefined;

  constructor(code: Code, details: string, fieldViolations: FieldViolation[] = [], options: RerankErrorOptions = {}) {
    const { requestId, ...errorOptions } = options;
    super(`${statusName(code)}: ${details}`, errorOptions);
    this.name = new.target.name;
    this.code = code;
    this.details = details;
    this.fieldViolations = fieldViolations;
    this.requestId = requestId;
  }
}

/** The request was refused as malformed or outside what the model accepts. */
export class InvalidRequestError extends RerankError {}

/** The request named a model the server does not serve; the message names the served ones. */
export class ModelNotFoundError extends RerankError {}

/** A configured limit was exceeded or the server is overloaded. */
export class ResourceExhaustedError extends RerankError {}

/** The call's deadline passed before the answer came. */
export class RerankTimeoutError extends RerankError {}

/** The service cannot answer right now; the call may be retried. */
export class UnavailableError extends RerankError {}

/** The call lacked valid credentials. */
export class AuthenticationError extends RerankError {}

/** The call was cancelled. */
export class CancelledError extends RerankError {}

/** The server failed while handling a valid request. */
export class ServerError extends RerankError {}

const BY_CODE: Partial<Record<Code, typeof RerankError>> = {
  [Code.InvalidArgument]: InvalidRequestError,
  [Code.OutOfRange]: InvalidRequestError,
  [Code.FailedPrecondition]: InvalidRequestError,
  [Code.NotFound]: ModelNotFoundError,
  [Code.ResourceExhausted]: ResourceExhaustedError,
  [Code.DeadlineExceeded]: RerankTimeoutError,
  [Code.Unavailable]: UnavailableError,
  [Code.Unauthenticated]: AuthenticationError,
  [Code.PermissionDenied]: AuthenticationError,
  [Code.Canceled]: CancelledError,
};

function errorFor(code: Code, details: string, violations: FieldViolation[], options?: RerankErrorOptions): RerankError {
  const ErrorClass = BY_CODE[code] ?? ServerError;
  return new ErrorClass(code, details, violations, options);
}

/** The header the server names the call's id in (sent first, so a failed call has it too). */
export const REQUEST_ID_HEADER = "x-request-id";

const BAD_REQUEST = "google.rpc.BadRequest";

/**
 * The field violations of a google.rpc.BadRequest: its field 1 holds them, each a message whose fields
 * 1 (field) and 2 (description) are rerank.v1.FieldViolation's, so each decodes as one (newer fields of
 * google.rpc's message are skipped as unknown).
 */
function badRequestViolations(bytes: Uint8Array): FieldViolation[] {
  const reader = new BinaryReader(bytes);
  const violations: FieldViolation[] = [];
  while (reader.pos < reader.len) {
    const [fieldNo, wireType] = reader.tag();
    if (fieldNo === 1 && wireType === WireType.LengthDelimited) {
      const violation = fromBinary(FieldViolationSchema, reader.bytes());
      violations.push(create(FieldViolationSchema, { field: violation.field, description: violation.description }));
    } else {
      reader.skip(wireType, fieldNo);
    }
  }
  return violations;
}

/**
 * Translate anything a call threw (a ConnectError or not) into the matching RerankError subclass.
 * `requestId`: the server's id for the call when its headers came but the error does not hold them (a
 * stream's deadline passing on the client's side).
 */
export function fromConnectError(reason: unknown, requestId?: string): RerankError {
  if (reason instanceof RerankError) {
    return reason;
  }
  const error = ConnectError.from(reason);
  const violations = error.details.flatMap((detail) =>
    "type" in detail && detail.type === BAD_REQUEST ? badRequestViolations(detail.value) : [],
  );
  // connect puts the response's headers and trailers in the error's metadata: the server's x-request-id
  // comes in the trailers of a failed unary call, in the headers of a stream.
  const sent = error.metadata.get(REQUEST_ID_HEADER) ?? requestId;
  return errorFor(error.code, error.rawMessage, violations, { cause: reason, requestId: sent });
}

/** The RerankError a failed RerankStream message stands for (what the unary call would have thrown). */
export function fromStreamError(error: StreamError): RerankError {
  return errorFor(error.code as Code, error.message, error.fieldViolations);
}
