package rerank

import (
	"errors"
	"fmt"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	rerankv1 "github.com/rerank-service/rerank-service/client/go/gen/rerank/v1"
)

// Every failed call returns an *Error; errors.Is matches it against the kind of failure, the same tree as
// the Python SDK's exceptions:
//
//	ErrInvalidRequest     INVALID_ARGUMENT, OUT_OF_RANGE, FAILED_PRECONDITION
//	ErrModelNotFound      NOT_FOUND (the request names a model the server does not serve)
//	ErrResourceExhausted  RESOURCE_EXHAUSTED (a limit or the server's capacity)
//	ErrTimeout            DEADLINE_EXCEEDED
//	ErrUnavailable        UNAVAILABLE (server down, draining or restarting: safe to retry)
//	ErrAuthentication     UNAUTHENTICATED, PERMISSION_DENIED
//	ErrCancelled          CANCELLED
//	ErrServer             INTERNAL, UNKNOWN and anything else
var (
	ErrInvalidRequest    = errors.New("rerank: invalid request")
	ErrModelNotFound     = errors.New("rerank: model not found")
	ErrResourceExhausted = errors.New("rerank: resource exhausted")
	ErrTimeout           = errors.New("rerank: deadline exceeded")
	ErrUnavailable       = errors.New("rerank: unavailable")
	ErrAuthentication    = errors.New("rerank: authentication failed")
	ErrCancelled         = errors.New("rerank: cancelled")
	ErrServer            = errors.New("rerank: server error")
)

var kindByCode = map[codes.Code]error{
	codes.InvalidArgument:    ErrInvalidRequest,
	codes.OutOfRange:         ErrInvalidRequest,
	codes.FailedPrecondition: ErrInvalidRequest,
	codes.NotFound:           ErrModelNotFound,
	codes.ResourceExhausted:  ErrResourceExhausted,
	codes.DeadlineExceeded:   ErrTimeout,
	codes.Unavailable:        ErrUnavailable,
	codes.Unauthenticated:    ErrAuthentication,
	codes.PermissionDenied:   ErrAuthentication,
	codes.Canceled:           ErrCancelled,
}

// Error is a failed call: the gRPC status code, the server's message, the request fields at fault (from
// the google.rpc.BadRequest the server attaches to request errors), and the call's request id.
type Error struct {
	Code            codes.Code
	Details         string
	FieldViolations []*rerankv1.FieldViolation
	// RequestID is the id the server handled and logged the call under (its x-request-id: the caller's
	// WithRequestID when valid, else one of its own); "" when no answer came from the server (a refusal
	// before sending, a connection that failed) and for a stream message's error.
	RequestID string
	// The status the call returned, details included; nil for an Error made here.
	status *status.Status
}

func (e *Error) Error() string {
	return fmt.Sprintf("%s: %s", statusName(e.Code), e.Details)
}

// Kind is the sentinel of the error's class (ErrInvalidRequest, ...).
func (e *Error) Kind() error {
	if kind, ok := kindByCode[e.Code]; ok {
		return kind
	}
	return ErrServer
}

// Is makes errors.Is(err, ErrInvalidRequest) and the like true for the matching codes.
func (e *Error) Is(target error) bool {
	return target == e.Kind()
}

// GRPCStatus lets status.Code(err) and status.FromError(err) see the status the call returned, its
// details (the google.rpc.BadRequest) included. For an Error made otherwise (a refused argument, a stream
// message's error) it is built from the fields, the field violations as a google.rpc.BadRequest.
func (e *Error) GRPCStatus() *status.Status {
	if e.status != nil && e.status.Code() == e.Code && e.status.Message() == e.Details {
		return e.status
	}
	st := status.New(e.Code, e.Details)
	if len(e.FieldViolations) == 0 {
		return st
	}
	badRequest := &errdetails.BadRequest{}
	for _, v := range e.FieldViolations {
		badRequest.FieldViolations = append(badRequest.FieldViolations,
			&errdetails.BadRequest_FieldViolation{Field: v.GetField(), Description: v.GetDescription()})
	}
	if withDetails, err := st.WithDetails(badRequest); err == nil {
		return withDetails
	}
	return st
}

// statusName is the code's name as gRPC spells it everywhere else ("INVALID_ARGUMENT"); grpc-go's
// String() gives "InvalidArgument".
func statusName(code codes.Code) string {
	if name, ok := statusNames[code]; ok {
		return name
	}
	return fmt.Sprintf("CODE(%d)", uint32(code))
}

var statusNames = map[codes.Code]string{
	codes.OK:                 "OK",
	codes.Canceled:           "CANCELLED",
	codes.Unknown:            "UNKNOWN",
	codes.InvalidArgument:    "INVALID_ARGUMENT",
	codes.DeadlineExceeded:   "DEADLINE_EXCEEDED",
	codes.NotFound:           "NOT_FOUND",
	codes.AlreadyExists:      "ALREADY_EXISTS",
	codes.PermissionDenied:   "PERMISSION_DENIED",
	codes.ResourceExhausted:  "RESOURCE_EXHAUSTED",
	codes.FailedPrecondition: "FAILED_PRECONDITION",
	codes.Aborted:            "ABORTED",
	codes.OutOfRange:         "OUT_OF_RANGE",
	codes.Unimplemented:      "UNIMPLEMENTED",
	codes.Internal:           "INTERNAL",
	codes.Unavailable:        "UNAVAILABLE",
	codes.DataLoss:           "DATA_LOSS",
	codes.Unauthenticated:    "UNAUTHENTICATED",
}

// FromError turns an error returned by a gRPC call into an *Error (nil stays nil; an *Error is returned
// as it is). A context's own error (the caller's deadline or cancellation) maps to its gRPC code.
func FromError(err error) error {
	if err == nil {
		return nil
	}
	var known *Error
	if errors.As(err, &known) {
		return known
	}
	st, ok := status.FromError(err)
	if !ok {
		st = status.FromContextError(err)
	}
	var violations []*rerankv1.FieldViolation
	for _, detail := range st.Details() {
		if badRequest, ok := detail.(*errdetails.BadRequest); ok {
			for _, v := range badRequest.GetFieldViolations() {
				violations = append(violations, &rerankv1.FieldViolation{Field: v.GetField(), Description: v.GetDescription()})
			}
		}
	}
	return &Error{Code: st.Code(), Details: st.Message(), FieldViolations: violations, status: st}
}

// FromStreamError is the *Error a failed RerankStream message stands for (what the unary call would have
// returned).
func FromStreamError(streamError *rerankv1.StreamError) *Error {
	return &Error{
		Code:            codes.Code(streamError.GetCode()),
		Details:         streamError.GetMessage(),
		FieldViolations: streamError.GetFieldViolations(),
	}
}
