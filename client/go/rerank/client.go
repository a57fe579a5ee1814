// Package rerank is the Go SDK of the rerank.v1 gRPC reranking service: a Client over the generated stubs
// (package rerankv1) with default deadlines, retries on UNAVAILABLE, TLS, bearer tokens and typed errors.
//
//	client, err := rerank.New("localhost:50051", rerank.WithTimeout(10*time.Second))
//	if err != nil { ... }
//	defer client.Close()
//	response, err := client.Rerank(ctx, "what is the capital of China?", []string{"Beijing", "rain"}, rerank.TopN(1))
//
// Results are the generated rerankv1 messages; every failed call returns an *Error (see ErrInvalidRequest).
// WithRequestID sets a call's request id, the one the server logs it under.
package rerank

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"os"
	"sync"
	"time"
	"unicode/utf8"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"

	rerankv1 "github.com/rerank-service/rerank-service/client/go/gen/rerank/v1"
)

const (
	// DefaultTimeout bounds every call whose context has no deadline of its own.
	DefaultTimeout = 30 * time.Second
	// DefaultMaxMessageBytes: rerank requests carry whole documents; gRPC's 4 MiB default is too small
	// for 1,000 long ones.
	DefaultMaxMessageBytes = 64 * 1024 * 1024
	// DefaultRetries is how often an idempotent call is retried on UNAVAILABLE.
	DefaultRetries = 3
	// gRPC caps a call's attempts at 5; the SDKs keep that cap.
	maxAttempts    = 5
	initialBackoff = 100 * time.Millisecond
	maxBackoff     = 2 * time.Second
	// RequestIDMax is the longest request id the server uses as given (it cuts a longer one).
	RequestIDMax    = 128
	requestIDHeader = "x-request-id"
)

// Client calls one rerank service. It is safe for concurrent use; Close it when done.
type Client struct {
	conn    *grpc.ClientConn
	stub    rerankv1.RerankServiceClient
	timeout time.Duration
	retries int
}

type clientConfig struct {
	timeout         time.Duration
	tls             *tls.Config
	token           string
	retries         int
	maxMessageBytes int
	dialOptions     []grpc.DialOption
}

// ClientOption configures New.
type ClientOption func(*clientConfig)

// WithTimeout sets the deadline of every call whose context has none (0: no deadline). For RerankStream
// it bounds the whole stream. Default: DefaultTimeout.
func WithTimeout(timeout time.Duration) ClientOption {
	return func(c *clientConfig) { c.timeout = timeout }
}

// WithTLS turns on TLS (see TLSConfig for a CA and an mTLS client certificate from PEM files).
func WithTLS(config *tls.Config) ClientOption {
	return func(c *clientConfig) { c.tls = config }
}

// WithToken sends `authorization: Bearer <token>` with every call. The token must be visible ASCII and
// spaces (what a gRPC header value holds): New refuses another character.
func WithToken(token string) ClientOption {
	return func(c *clientConfig) { c.token = token }
}

// WithRetries sets how often Rerank, Score, ModelInfo and ListModels are retried, with backoff, on UNAVAILABLE
// (the server is down, draining or restarting); at most 4. Streams are not retried. Default: DefaultRetries.
func WithRetries(retries int) ClientOption {
	return func(c *clientConfig) { c.retries = retries }
}

// WithMaxMessageBytes sets the largest message sent or received. Default: DefaultMaxMessageBytes.
func WithMaxMessageBytes(size int) ClientOption {
	return func(c *clientConfig) { c.maxMessageBytes = size }
}

// WithDialOptions adds gRPC dial options (interceptors, a custom dialer, ...) after the SDK's own.
func WithDialOptions(options ...grpc.DialOption) ClientOption {
	return func(c *clientConfig) { c.dialOptions = append(c.dialOptions, options...) }
}

// TLSConfig is the TLS configuration from PEM files: the CA to trust (empty: the system's), and for mTLS
// the client's certificate chain and key (both empty: no client certificate).
func TLSConfig(rootCertificates, certificateChain, privateKey string) (*tls.Config, error) {
	config := &tls.Config{MinVersion: tls.VersionTLS12}
	if rootCertificates != "" {
		pem, err := os.ReadFile(rootCertificates)
		if err != nil {
			return nil, err
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("rerank: no PEM certificate in %s", rootCertificates)
		}
		config.RootCAs = pool
	}
	if certificateChain != "" || privateKey != "" {
		pair, err := tls.LoadX509KeyPair(certificateChain, privateKey)
		if err != nil {
			return nil, err
		}
		config.Certificates = []tls.Certificate{pair}
	}
	return config, nil
}

type bearerToken string

func (t bearerToken) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(t)}, nil
}

// The Python SDK sends the token on plaintext channels too (a sidecar or a trusted network); so does this.
func (bearerToken) RequireTransportSecurity() bool { return false }

// checkToken refuses a token a header value cannot carry (a newline, a byte outside visible ASCII) when
// the client is made, not as a failure of every call. The error gives the position, never the token.
func checkToken(token string) error {
	for i := 0; i < len(token); i++ {
		if token[i] < 0x20 || token[i] > 0x7e {
			return fmt.Errorf("rerank: token: the byte at position %d cannot be sent in a gRPC header (only visible ASCII and spaces can)", i)
		}
	}
	return nil
}

// New connects lazily to target: `host:port`, or `dns:///rerank.ns.svc.cluster.local:50051` to spread
// calls round-robin over every address the name resolves to (a headless Service's pods). Its errors are
// plain errors, not *Error: a token (WithToken) with a character a gRPC header cannot carry, or dial
// options grpc-go refuses.
func New(target string, options ...ClientOption) (*Client, error) {
	config := clientConfig{timeout: DefaultTimeout, retries: DefaultRetries, maxMessageBytes: DefaultMaxMessageBytes}
	for _, option := range options {
		option(&config)
	}
	if err := checkToken(config.token); err != nil {
		return nil, err
	}
	transport := grpc.WithInsecure()
	if config.tls != nil {
		transport = grpc.WithTransportCredentials(credentials.NewTLS(config.tls))
	}
	dialOptions := []grpc.DialOption{
		transport,
		grpc.WithDefaultServiceConfig(`{"loadBalancingConfig": [{"round_robin": {}}]}`),
		grpc.WithDefaultCallOptions(
			grpc.MaxCallRecvMsgSize(config.maxMessageBytes), grpc.MaxCallSendMsgSize(config.maxMessageBytes),
		),
		// Find dead connections (a replica gone without a FIN) within ~40 s, idle or not.
		grpc.WithKeepaliveParams(keepalive.ClientParameters{
			Time: 30 * time.Second, Timeout: 10 * time.Second, PermitWithoutStream: true,
		}),
	}
	if config.token != "" {
		dialOptions = append(dialOptions, grpc.WithPerRPCCredentials(bearerToken(config.token)))
	}
	conn, err := grpc.Dial(target, append(dialOptions, config.dialOptions...)...)
	if err != nil {
		// A local mistake (dial options grpc-go refuses), not a call's failure: no *Error, no gRPC code.
		return nil, fmt.Errorf("rerank: %w", err)
	}
	return &Client{conn: conn, stub: rerankv1.NewRerankServiceClient(conn), timeout: config.timeout, retries: config.retries}, nil
}

// Close closes the connection; calls in flight fail with CANCELLED.
func (c *Client) Close() error {
	return c.conn.Close()
}

// Stub is the generated client over the same connection, for what the wrapper does not cover.
func (c *Client) Stub() rerankv1.RerankServiceClient {
	return c.stub
}

// Truncation says how a pair longer than the maximum length is handled.
type Truncation = rerankv1.Truncation

const (
	// TruncationEnd cuts the document at its end so the pair fits (the server's default).
	TruncationEnd = rerankv1.Truncation_TRUNCATION_END
	// TruncationNone refuses a pair that does not fit (INVALID_ARGUMENT).
	TruncationNone = rerankv1.Truncation_TRUNCATION_NONE
	// TruncationChunk scores the document in overlapping windows and keeps the best.
	TruncationChunk = rerankv1.Truncation_TRUNCATION_CHUNK
	// TruncationStart cuts the document at its start so the pair fits (its last tokens are kept).
	TruncationStart = rerankv1.Truncation_TRUNCATION_START
)

// Option sets a field of a Rerank or Score request; TopN and ReturnDocuments apply to Rerank only, and
// ModelInfo reads Model alone.
type Option func(*requestOptions)

type requestOptions struct {
	topN            uint32
	returnDocuments bool
	truncation      Truncation
	maxLength       uint32
	chunkOverlap    *uint32
	model           string
	priority        uint32
}

// TopN returns only the n best results (0: all, best first).
func TopN(n uint32) Option { return func(o *requestOptions) { o.topN = n } }

// ReturnDocuments echoes each result's document.
func ReturnDocuments() Option { return func(o *requestOptions) { o.returnDocuments = true } }

// WithTruncation sets how long pairs are handled (TruncationEnd, TruncationStart, TruncationNone, TruncationChunk).
func WithTruncation(truncation Truncation) Option {
	return func(o *requestOptions) { o.truncation = truncation }
}

// MaxLength sets the tokens per pair, special tokens included (0: the model's limit).
func MaxLength(tokens uint32) Option { return func(o *requestOptions) { o.maxLength = tokens } }

// ChunkOverlap sets the tokens shared by consecutive windows with TruncationChunk (unset: the server's).
func ChunkOverlap(tokens uint32) Option { return func(o *requestOptions) { o.chunkOverlap = &tokens } }

// Model names the served model to use (as ListModels lists it; "": the server's default). ModelInfo takes it too.
func Model(name string) Option { return func(o *requestOptions) { o.model = name } }

// Priority sets how soon the call is handled: lower first, 0 (the default) first of all. Above 0 (background
// work such as re-indexing) the call is refused first under load and queued behind calls at 0.
func Priority(priority uint32) Option { return func(o *requestOptions) { o.priority = priority } }

func collect(options []Option) requestOptions {
	var o requestOptions
	for _, option := range options {
		option(&o)
	}
	return o
}

// RerankRequest is the request Rerank sends for these arguments. Validation of the values is the server's job.
func RerankRequest(query string, documents []string, options ...Option) *rerankv1.RerankRequest {
	o := collect(options)
	return &rerankv1.RerankRequest{
		Query:           query,
		Documents:       documents,
		TopN:            o.topN,
		ReturnDocuments: o.returnDocuments,
		Truncation:      o.truncation,
		MaxLength:       o.maxLength,
		ChunkOverlap:    o.chunkOverlap,
		Model:           o.model,
		Priority:        o.priority,
	}
}

// Pair is one (text_a, text_b) pair for Score: TextA plays the query's part, TextB the document's.
type Pair struct {
	TextA, TextB string
}

// ScoreRequest is the request Score sends for these arguments.
func ScoreRequest(pairs []Pair, options ...Option) *rerankv1.ScoreRequest {
	o := collect(options)
	request := &rerankv1.ScoreRequest{
		Truncation: o.truncation, MaxLength: o.maxLength, ChunkOverlap: o.chunkOverlap, Model: o.model,
		Priority: o.priority,
	}
	for _, pair := range pairs {
		request.Pairs = append(request.Pairs, &rerankv1.TextPair{TextA: pair.TextA, TextB: pair.TextB})
	}
	return request
}

// StreamRequest is one RerankStream message: an id of your choice and the arguments of Rerank.
func StreamRequest(id, query string, documents []string, options ...Option) *rerankv1.RerankStreamRequest {
	return &rerankv1.RerankStreamRequest{Id: id, Request: RerankRequest(query, documents, options...)}
}

// Rerank scores documents against query; results come best first.
func (c *Client) Rerank(ctx context.Context, query string, documents []string, options ...Option) (*rerankv1.RerankResponse, error) {
	request := RerankRequest(query, documents, options...)
	if err := checkRerankRequest("", request); err != nil {
		return nil, err
	}
	return call(ctx, c, func(ctx context.Context, options ...grpc.CallOption) (*rerankv1.RerankResponse, error) {
		return c.stub.Rerank(ctx, request, options...)
	})
}

// Score scores (TextA, TextB) pairs; scores come in request order.
func (c *Client) Score(ctx context.Context, pairs []Pair, options ...Option) (*rerankv1.ScoreResponse, error) {
	for i, pair := range pairs {
		if err := checkText(fmt.Sprintf("pairs[%d].text_a", i), pair.TextA); err != nil {
			return nil, err
		}
		if err := checkText(fmt.Sprintf("pairs[%d].text_b", i), pair.TextB); err != nil {
			return nil, err
		}
	}
	request := ScoreRequest(pairs, options...)
	if err := checkText("model", request.Model); err != nil {
		return nil, err
	}
	return call(ctx, c, func(ctx context.Context, options ...grpc.CallOption) (*rerankv1.ScoreResponse, error) {
		return c.stub.Score(ctx, request, options...)
	})
}

// ModelInfo describes a served model (the default one unless Model names another), its maximum length
// and the service's limits.
func (c *Client) ModelInfo(ctx context.Context, options ...Option) (*rerankv1.GetModelInfoResponse, error) {
	request := &rerankv1.GetModelInfoRequest{Model: collect(options).model}
	if err := checkText("model", request.Model); err != nil {
		return nil, err
	}
	return call(ctx, c, func(ctx context.Context, options ...grpc.CallOption) (*rerankv1.GetModelInfoResponse, error) {
		return c.stub.GetModelInfo(ctx, request, options...)
	})
}

// ListModels describes every served model and names the default one.
func (c *Client) ListModels(ctx context.Context) (*rerankv1.ListModelsResponse, error) {
	return call(ctx, c, func(ctx context.Context, options ...grpc.CallOption) (*rerankv1.ListModelsResponse, error) {
		return c.stub.ListModels(ctx, &rerankv1.ListModelsRequest{}, options...)
	})
}

// refused is the caller's invalid request naming field, returned before anything is sent.
func refused(field, description string) *Error {
	violation := &rerankv1.FieldViolation{Field: field, Description: description}
	return &Error{Code: codes.InvalidArgument, Details: field + ": " + description, FieldViolations: []*rerankv1.FieldViolation{violation}}
}

// checkText refuses text protobuf cannot carry (a string must be valid UTF-8) as the caller's invalid
// request, before sending: grpc-go's marshaling failure would read as an INTERNAL server fault.
func checkText(field, text string) error {
	if utf8.ValidString(text) {
		return nil
	}
	return refused(field, "is not valid UTF-8")
}

type requestIDKey struct{}

// WithRequestID returns a context whose calls (Rerank, Score, ModelInfo, ListModels, and RerankStream
// for the whole stream) send id as `x-request-id`: the id the server logs the call under, to find it from
// the caller's own logs. A retry resends the same id. Up to RequestIDMax visible ASCII characters and
// spaces, which the server uses as given; a call refuses another id with an ErrInvalidRequest naming
// request_id, before sending. "": the server makes its own id. Every *Error from the server carries the id
// it used as RequestID.
func WithRequestID(ctx context.Context, id string) context.Context {
	return context.WithValue(ctx, requestIDKey{}, id)
}

// withRequestID adds the request id of ctx (WithRequestID) to its outgoing metadata, or refuses one the
// server would not use as given (it replaces one outside visible ASCII and cuts a longer one): the
// caller's logs would hold another id than the service's.
func withRequestID(ctx context.Context) (context.Context, error) {
	id, _ := ctx.Value(requestIDKey{}).(string)
	if id == "" {
		return ctx, nil
	}
	if n := utf8.RuneCountInString(id); n > RequestIDMax {
		return nil, refused("request_id", fmt.Sprintf("is %d characters long; at most %d are sent", n, RequestIDMax))
	}
	for i := 0; i < len(id); i++ {
		if id[i] < 0x20 || id[i] > 0x7e {
			return nil, refused("request_id", fmt.Sprintf("the byte at position %d cannot be sent in a gRPC header (only visible ASCII and spaces can)", i))
		}
	}
	return metadata.AppendToOutgoingContext(ctx, requestIDHeader, id), nil
}

// withServerRequestID sets the RequestID of a call's *Error from the metadata the server sent, if any.
func withServerRequestID(err error, header metadata.MD) error {
	var rerankError *Error
	if ids := header.Get(requestIDHeader); len(ids) > 0 && errors.As(err, &rerankError) && rerankError.RequestID == "" {
		rerankError.RequestID = ids[0]
	}
	return err
}

// checkRerankRequest is checkText on every string of request; prefix leads each field's name.
func checkRerankRequest(prefix string, request *rerankv1.RerankRequest) error {
	if err := checkText(prefix+"query", request.GetQuery()); err != nil {
		return err
	}
	for i, document := range request.GetDocuments() {
		if err := checkText(fmt.Sprintf("%sdocuments[%d]", prefix, i), document); err != nil {
			return err
		}
	}
	return checkText(prefix+"model", request.GetModel())
}

// withDeadline applies the client's default timeout to a context that has no deadline.
func (c *Client) withDeadline(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok || c.timeout <= 0 {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, c.timeout)
}

// call runs an idempotent unary call (scoring has no side effects), retrying it on UNAVAILABLE with
// exponential backoff within the one deadline (every attempt with the call's one request id), and returns
// the response or an *Error.
func call[T any](ctx context.Context, c *Client, invoke func(context.Context, ...grpc.CallOption) (T, error)) (T, error) {
	ctx, err := withRequestID(ctx)
	if err != nil {
		var none T
		return none, err
	}
	ctx, cancel := c.withDeadline(ctx)
	defer cancel()
	attempts := c.retries + 1
	if attempts > maxAttempts {
		attempts = maxAttempts
	}
	for attempt := 1; ; attempt++ {
		// A failed unary call's request id comes in its trailers (the server sends no headers before an
		// answer, so that a call it refuses can be retried); the headers are read too.
		var header, trailer metadata.MD
		response, err := invoke(ctx, grpc.Header(&header), grpc.Trailer(&trailer))
		if err == nil {
			return response, nil
		}
		failure := withServerRequestID(FromError(err), metadata.Join(header, trailer))
		var rerankError *Error
		if attempt >= attempts || !errors.As(failure, &rerankError) || rerankError.Code != codes.Unavailable {
			return response, failure
		}
		// Reconnect now rather than after the channel's own (longer) reconnect backoff.
		c.conn.ResetConnectBackoff()
		pause := Backoff(attempt)
		if deadline, ok := ctx.Deadline(); ok && time.Until(deadline) <= pause {
			return response, failure // no time left for another attempt: the server is unavailable
		}
		select {
		case <-ctx.Done():
			return response, FromError(ctx.Err())
		case <-time.After(pause):
		}
	}
}

// The jitter's own source, seeded per process: before Go 1.20 the global one starts from seed 1 in every
// process, and clients restarted together would retry in lockstep. A *rand.Rand is not safe for concurrent use.
var (
	jitterMu sync.Mutex
	jitter   = rand.New(rand.NewSource(time.Now().UnixNano()))
)

// Backoff is the pause before retry number `retry` (1, 2, ...; below 1 counts as 1): a random time between
// half and all of min(100 ms * 2^(retry-1), 2 s).
func Backoff(retry int) time.Duration {
	// Doubled step by step, not shifted: no overflow for a large retry, no negative shift below 1.
	ceiling := initialBackoff
	for i := 1; i < retry && ceiling < maxBackoff; i++ {
		ceiling *= 2
	}
	if ceiling > maxBackoff {
		ceiling = maxBackoff
	}
	jitterMu.Lock()
	defer jitterMu.Unlock()
	return ceiling/2 + time.Duration(jitter.Int63n(int64(ceiling/2)+1))
}

// Stream is one RerankStream: Send independent requests (see StreamRequest), CloseSend when done, and Recv
// the answers as they complete (io.EOF after the last). A failed message is answered with its Error set
// (FromStreamError turns it into the *Error the unary call would have returned); a failure of the stream
// itself is returned by Send or Recv as an *Error.
type Stream struct {
	stream rerankv1.RerankService_RerankStreamClient
	cancel context.CancelFunc
}

// RerankStream opens a stream; the client's timeout (when ctx has no deadline) bounds the whole stream,
// and cancelling ctx ends it. A request id (WithRequestID on ctx) is the whole stream's. Streams are not
// retried.
func (c *Client) RerankStream(ctx context.Context) (*Stream, error) {
	ctx, err := withRequestID(ctx)
	if err != nil {
		return nil, err
	}
	ctx, cancel := c.withDeadline(ctx)
	stream, err := c.stub.RerankStream(ctx)
	if err != nil {
		cancel()
		return nil, FromError(err)
	}
	return &Stream{stream: stream, cancel: cancel}, nil
}

// Send sends one request. io.EOF means the stream has ended: Recv returns why. A request with text that is
// not valid UTF-8 is not sent: Send returns an ErrInvalidRequest naming the field ("request.documents[1]"),
// and the stream goes on.
func (s *Stream) Send(request *rerankv1.RerankStreamRequest) error {
	if err := checkText("id", request.GetId()); err != nil {
		return err
	}
	if err := checkRerankRequest("request.", request.GetRequest()); err != nil {
		return err
	}
	if err := s.stream.Send(request); err != nil {
		if err == io.EOF {
			return err
		}
		return FromError(err)
	}
	return nil
}

// CloseSend says no more requests will come; answers to those sent keep coming.
func (s *Stream) CloseSend() error {
	return FromError(s.stream.CloseSend())
}

// Recv returns the next answer, io.EOF once every answer came, or the stream's failure as an *Error.
func (s *Stream) Recv() (*rerankv1.RerankStreamResponse, error) {
	response, err := s.stream.Recv()
	if err != nil {
		s.cancel()
		if err == io.EOF {
			return nil, err
		}
		// The stream has ended: Header returns at once, with the server's id when its headers came.
		header, _ := s.stream.Header()
		return nil, withServerRequestID(FromError(err), header)
	}
	return response, nil
}

// Close ends the stream early (the server stops its pending work); not needed after Recv returned an error.
func (s *Stream) Close() {
	s.cancel()
}
