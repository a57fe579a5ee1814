// The SDK against a real `rerank serve`: tests/test_sdks.py starts the stack, sets the environment below,
// runs this suite (go test) and compares the answers it writes with the Python SDK's.
//
//	RERANK_TARGET          a plaintext frontend (host:port)
//	RERANK_SDK_CASES       the shared requests (JSON); RERANK_SDK_ANSWERS: where this suite writes its answers
//	RERANK_SECURE_TARGET   a frontend with mTLS, a bearer token and a small max_total_tokens, and
//	RERANK_TLS_CA, RERANK_TLS_CERT, RERANK_TLS_KEY, RERANK_TOKEN: what its clients need
package rerank_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	rerankv1 "github.com/rerank-service/rerank-service/client/go/gen/rerank/v1"
	"github.com/rerank-service/rerank-service/client/go/rerank"
)

func env(t *testing.T, name string) string {
	t.Helper()
	value := os.Getenv(name)
	if value == "" {
		t.Fatalf("%s is not set: run this suite through tests/test_sdks.py (it starts the server)", name)
	}
	return value
}

func newClient(t *testing.T, target string, options ...rerank.ClientOption) *rerank.Client {
	t.Helper()
	client, err := rerank.New(target, append([]rerank.ClientOption{rerank.WithTimeout(60 * time.Second)}, options...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	return client
}

// -- the shared cases, answered in the shape tests/test_sdks.py compares ----------------------------------

type caseOptions struct {
	TopN            *uint32 `json:"top_n"`
	ReturnDocuments bool    `json:"return_documents"`
	Truncation      string  `json:"truncation"`
	Model           string  `json:"model"`
	MaxLength       *uint32 `json:"max_length"`
	ChunkOverlap    *uint32 `json:"chunk_overlap"`
}

func (o caseOptions) options(t *testing.T) []rerank.Option {
	var options []rerank.Option
	if o.TopN != nil {
		options = append(options, rerank.TopN(*o.TopN))
	}
	if o.ReturnDocuments {
		options = append(options, rerank.ReturnDocuments())
	}
	switch o.Truncation {
	case "":
	case "end":
		options = append(options, rerank.WithTruncation(rerank.TruncationEnd))
	case "none":
		options = append(options, rerank.WithTruncation(rerank.TruncationNone))
	case "chunk":
		options = append(options, rerank.WithTruncation(rerank.TruncationChunk))
	default:
		t.Fatalf("unknown truncation %q", o.Truncation)
	}
	if o.MaxLength != nil {
		options = append(options, rerank.MaxLength(*o.MaxLength))
	}
	if o.ChunkOverlap != nil {
		options = append(options, rerank.ChunkOverlap(*o.ChunkOverlap))
	}
	if o.Model != "" {
		options = append(options, rerank.Model(o.Model))
	}
	return options
}

type cases struct {
	RequestID []string `json:"request_id"`
	Rerank    []struct {
		Query     string      `json:"query"`
		Documents []string    `json:"documents"`
		Options   caseOptions `json:"options"`
	} `json:"rerank"`
	Score []struct {
		Pairs   [][2]string `json:"pairs"`
		Options caseOptions `json:"options"`
	} `json:"score"`
	Stream []struct {
		ID        string      `json:"id"`
		Query     string      `json:"query"`
		Documents []string    `json:"documents"`
		Options   caseOptions `json:"options"`
	} `json:"stream"`
}

type object = map[string]interface{}

func usage(u *rerankv1.Usage) object {
	return object{
		"input_tokens":        u.GetInputTokens(),
		"truncated_documents": u.GetTruncatedDocuments(),
		"model_inputs":        u.GetModelInputs(),
	}
}

func rerankAnswer(response *rerankv1.RerankResponse) object {
	results := []object{}
	for _, r := range response.GetResults() {
		var document interface{}
		if r.Document != nil {
			document = *r.Document
		}
		results = append(results, object{
			"index": r.GetIndex(), "score": r.GetScore(), "logit": r.GetLogit(), "document": document,
			"windows": r.GetWindows(), "truncated": r.GetTruncated(),
		})
	}
	return object{"model": response.GetModel(), "results": results, "usage": usage(response.GetUsage())}
}

func modelInfoAnswer(info *rerankv1.GetModelInfoResponse) object {
	limits := info.GetLimits()
	return object{
		"model": info.GetModel(), "max_length": info.GetMaxLength(), "precision": info.GetPrecision(),
		"triton_model_name": info.GetTritonModelName(), "triton_model_version": info.GetTritonModelVersion(),
		"tokenizer": info.GetTokenizer(),
		"limits": object{
			"max_documents": limits.GetMaxDocuments(), "max_total_tokens": limits.GetMaxTotalTokens(),
			"max_query_tokens": limits.GetMaxQueryTokens(), "max_message_bytes": limits.GetMaxMessageBytes(),
			"default_chunk_overlap": limits.GetDefaultChunkOverlap(),
		},
	}
}

func TestSharedCases(t *testing.T) {
	var shared cases
	data, err := os.ReadFile(env(t, "RERANK_SDK_CASES"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(data, &shared); err != nil {
		t.Fatal(err)
	}
	client := newClient(t, env(t, "RERANK_TARGET"))
	ctx := context.Background()

	reranked := []object{}
	for _, c := range shared.Rerank {
		response, err := client.Rerank(ctx, c.Query, c.Documents, c.Options.options(t)...)
		if err != nil {
			t.Fatal(err)
		}
		reranked = append(reranked, rerankAnswer(response))
	}

	scored := []object{}
	for _, c := range shared.Score {
		pairs := make([]rerank.Pair, len(c.Pairs))
		for i, pair := range c.Pairs {
			pairs[i] = rerank.Pair{TextA: pair[0], TextB: pair[1]}
		}
		response, err := client.Score(ctx, pairs, c.Options.options(t)...)
		if err != nil {
			t.Fatal(err)
		}
		scores := []object{}
		for _, s := range response.GetScores() {
			scores = append(scores, object{
				"score": s.GetScore(), "logit": s.GetLogit(), "windows": s.GetWindows(), "truncated": s.GetTruncated(),
			})
		}
		scored = append(scored, object{"model": response.GetModel(), "scores": scores, "usage": usage(response.GetUsage())})
	}

	stream, err := client.RerankStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range shared.Stream {
		if err := stream.Send(rerank.StreamRequest(c.ID, c.Query, c.Documents, c.Options.options(t)...)); err != nil {
			t.Fatal(err)
		}
	}
	streamed := object{}
	for _, answer := range closeAndReceive(t, stream) {
		if _, seen := streamed[answer.GetId()]; seen {
			t.Fatalf("answered twice: %s", answer.GetId())
		}
		if failed := answer.GetError(); failed != nil {
			streamError := rerank.FromStreamError(failed)
			fields := []string{}
			for _, v := range streamError.FieldViolations {
				fields = append(fields, v.GetField())
			}
			streamed[answer.GetId()] = object{"error": object{"code": streamError.Code, "fields": fields}}
		} else {
			streamed[answer.GetId()] = object{"response": rerankAnswer(answer.GetResponse())}
		}
	}

	info, err := client.ModelInfo(ctx)
	if err != nil {
		t.Fatal(err)
	}
	models, err := client.ListModels(ctx)
	if err != nil {
		t.Fatal(err)
	}
	listed := []object{}
	for _, model := range models.GetModels() {
		listed = append(listed, modelInfoAnswer(model))
	}

	requestIDs := []object{}
	for _, id := range shared.RequestID {
		_, err := client.Rerank(rerank.WithRequestID(ctx, id), "", []string{"a document"})
		failed := failure(t, err)
		fields := []string{}
		for _, v := range failed.FieldViolations {
			fields = append(fields, v.GetField())
		}
		var requestID interface{}
		if failed.RequestID != "" {
			requestID = failed.RequestID
		}
		requestIDs = append(requestIDs, object{"code": failed.Code, "fields": fields, "request_id": requestID})
	}

	answers, err := json.Marshal(object{
		"rerank": reranked, "score": scored, "stream": streamed, "request_id": requestIDs, "model_info": modelInfoAnswer(info),
		"list_models": object{"default_model": models.GetDefaultModel(), "models": listed},
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(env(t, "RERANK_SDK_ANSWERS"), answers, 0o644); err != nil {
		t.Fatal(err)
	}
}

// closeAndReceive closes the sending side of stream and returns every answer, until io.EOF.
func closeAndReceive(t *testing.T, stream *rerank.Stream) []*rerankv1.RerankStreamResponse {
	t.Helper()
	if err := stream.CloseSend(); err != nil {
		t.Fatal(err)
	}
	answers := []*rerankv1.RerankStreamResponse{}
	for {
		answer, err := stream.Recv()
		if err == io.EOF {
			return answers
		}
		if err != nil {
			t.Fatal(err)
		}
		answers = append(answers, answer)
	}
}

// -- errors: one kind per code, with the code, the message and the fields at fault ------------------------

func failure(t *testing.T, err error) *rerank.Error {
	t.Helper()
	if err == nil {
		t.Fatal("the call succeeded")
	}
	var rerankError *rerank.Error
	if !errors.As(err, &rerankError) {
		t.Fatalf("not a *rerank.Error: %T %v", err, err)
	}
	return rerankError
}

func expectKind(t *testing.T, err error, kind error, code codes.Code) *rerank.Error {
	t.Helper()
	rerankError := failure(t, err)
	if !errors.Is(err, kind) || rerankError.Code != code || status.Code(err) != code {
		t.Fatalf("want %v (%v), got %v: %v", kind, code, rerankError.Code, err)
	}
	for _, other := range []error{
		rerank.ErrInvalidRequest, rerank.ErrModelNotFound, rerank.ErrResourceExhausted, rerank.ErrTimeout, rerank.ErrUnavailable,
		rerank.ErrAuthentication, rerank.ErrCancelled, rerank.ErrServer,
	} {
		if other != kind && errors.Is(err, other) {
			t.Fatalf("%v is also %v", err, other)
		}
	}
	return rerankError
}

func TestInvalidArgumentCarriesTheFieldViolations(t *testing.T) {
	client := newClient(t, env(t, "RERANK_TARGET"))
	_, err := client.Rerank(context.Background(), "", []string{"a document"})
	failed := expectKind(t, err, rerank.ErrInvalidRequest, codes.InvalidArgument)
	if !strings.HasPrefix(err.Error(), "INVALID_ARGUMENT: ") {
		t.Fatalf("message: %q", err.Error())
	}
	if len(failed.FieldViolations) != 1 || failed.FieldViolations[0].GetField() != "query" ||
		failed.FieldViolations[0].GetDescription() == "" {
		t.Fatalf("violations: %v", failed.FieldViolations)
	}
	if fields := badRequestFields(t, err); fields != "query" {
		t.Fatalf("status.FromError(err).Details(): %q", fields)
	}

	_, err = client.Score(context.Background(), nil, rerank.MaxLength(100000))
	failed = expectKind(t, err, rerank.ErrInvalidRequest, codes.InvalidArgument)
	found := false
	for _, v := range failed.FieldViolations {
		found = found || v.GetField() == "pairs"
	}
	if !found {
		t.Fatalf("no violation of pairs: %v", failed.FieldViolations)
	}
}

// badRequestFields is the fields of the google.rpc.BadRequest that status.FromError(err) carries, as
// generic gRPC code reads them.
func badRequestFields(t *testing.T, err error) string {
	t.Helper()
	st, ok := status.FromError(err)
	if !ok {
		t.Fatalf("no status: %v", err)
	}
	var fields []string
	for _, detail := range st.Details() {
		if badRequest, ok := detail.(*errdetails.BadRequest); ok {
			for _, v := range badRequest.GetFieldViolations() {
				fields = append(fields, v.GetField())
			}
		}
	}
	return strings.Join(fields, " ")
}

// refusedField is the one field an ErrInvalidRequest names.
func refusedField(t *testing.T, err error) string {
	t.Helper()
	failed := expectKind(t, err, rerank.ErrInvalidRequest, codes.InvalidArgument)
	if len(failed.FieldViolations) != 1 {
		t.Fatalf("violations: %v", failed.FieldViolations)
	}
	return failed.FieldViolations[0].GetField()
}

func TestTextThatIsNotUTF8IsTheCallersInvalidRequest(t *testing.T) {
	// Refused before sending: no server listens at this target, and no attempt is made.
	client := newClient(t, "127.0.0.1:1", rerank.WithRetries(0))
	ctx := context.Background()
	for _, refused := range []struct {
		field string
		err   error
	}{
		{"documents[1]", second(client.Rerank(ctx, "q", []string{"fine", "bad \xff byte"}))},
		{"pairs[0].text_b", second(client.Score(ctx, []rerank.Pair{{TextA: "q", TextB: "\xed\xa0\x80"}}))},
		{"model", second(client.Rerank(ctx, "q", []string{"d"}, rerank.Model("m\xff")))},
		{"model", second(client.Score(ctx, []rerank.Pair{{TextA: "q", TextB: "d"}}, rerank.Model("\xc3")))},
		{"model", second(client.ModelInfo(ctx, rerank.Model("\xff")))},
	} {
		if field := refusedField(t, refused.err); field != refused.field {
			t.Fatalf("want %s, got %s", refused.field, field)
		}
		if fields := badRequestFields(t, refused.err); fields != refused.field {
			t.Fatalf("status.FromError(err).Details(): want %s, got %q", refused.field, fields)
		}
	}
}

func second[T any](_ T, err error) error { return err }

func TestStreamSendRefusesTextThatIsNotUTF8AndTheStreamGoesOn(t *testing.T) {
	client := newClient(t, env(t, "RERANK_TARGET"))
	stream, err := client.RerankStream(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer stream.Close()
	if err := stream.Send(rerank.StreamRequest("a", "q", []string{"d"})); err != nil {
		t.Fatal(err)
	}
	for field, bad := range map[string]*rerankv1.RerankStreamRequest{
		"request.documents[1]": rerank.StreamRequest("b", "q", []string{"fine", "bad \xff"}),
		"request.query":        rerank.StreamRequest("b", "\xed\xa0\x80", []string{"d"}),
		"request.model":        rerank.StreamRequest("b", "q", []string{"d"}, rerank.Model("\xff")),
		"id":                   rerank.StreamRequest("b\xff", "q", []string{"d"}),
	} {
		if got := refusedField(t, stream.Send(bad)); got != field {
			t.Fatalf("want %s, got %s", field, got)
		}
	}
	if err := stream.Send(rerank.StreamRequest("c", "q", []string{"d"})); err != nil {
		t.Fatal(err)
	}
	answered := map[string]bool{}
	for _, answer := range closeAndReceive(t, stream) {
		if answer.GetError() != nil {
			t.Fatalf("%s: %v", answer.GetId(), rerank.FromStreamError(answer.GetError()))
		}
		answered[answer.GetId()] = true
	}
	if len(answered) != 2 || !answered["a"] || !answered["c"] {
		t.Fatalf("answered: %v", answered)
	}
}

func TestModelNotFoundNamesTheServedModels(t *testing.T) {
	client := newClient(t, env(t, "RERANK_TARGET"))
	ctx := context.Background()
	models, err := client.ListModels(ctx)
	if err != nil {
		t.Fatal(err)
	}
	served := models.GetDefaultModel()
	if info, err := client.ModelInfo(ctx, rerank.Model(served)); err != nil || info.GetTritonModelName() != served {
		t.Fatalf("ModelInfo(%q): %v, %v", served, info, err)
	}
	calls := []func() error{
		func() error {
			_, err := client.Rerank(ctx, "q", []string{"d"}, rerank.Model("no-such-model"))
			return err
		},
		func() error {
			_, err := client.Score(ctx, []rerank.Pair{{TextA: "q", TextB: "d"}}, rerank.Model("no-such-model"))
			return err
		},
		func() error { _, err := client.ModelInfo(ctx, rerank.Model("no-such-model")); return err },
	}
	for _, call := range calls {
		err := call()
		failed := expectKind(t, err, rerank.ErrModelNotFound, codes.NotFound)
		if !strings.Contains(failed.Details, served) || len(failed.FieldViolations) != 1 ||
			failed.FieldViolations[0].GetField() != "model" {
			t.Fatalf("%v: %v", err, failed.FieldViolations)
		}
	}
}

func TestDeadlineExceeded(t *testing.T) {
	client := newClient(t, env(t, "RERANK_TARGET"))
	documents := make([]string, 200)
	for i := range documents {
		documents[i] = strings.Repeat(fmt.Sprintf("document %d ", i), 40)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Millisecond)
	defer cancel()
	_, err := client.Rerank(ctx, "a query", documents)
	expectKind(t, err, rerank.ErrTimeout, codes.DeadlineExceeded)

	// The client's default timeout applies to a context without a deadline.
	short := newClient(t, env(t, "RERANK_TARGET"), rerank.WithTimeout(time.Millisecond))
	_, err = short.Rerank(context.Background(), "a query", documents)
	expectKind(t, err, rerank.ErrTimeout, codes.DeadlineExceeded)
}

func secureTLS(t *testing.T, withClientCertificate bool) rerank.ClientOption {
	t.Helper()
	cert, key := "", ""
	if withClientCertificate {
		cert, key = env(t, "RERANK_TLS_CERT"), env(t, "RERANK_TLS_KEY")
	}
	config, err := rerank.TLSConfig(env(t, "RERANK_TLS_CA"), cert, key)
	if err != nil {
		t.Fatal(err)
	}
	return rerank.WithTLS(config)
}

func TestUnauthenticated(t *testing.T) {
	for _, options := range [][]rerank.ClientOption{{}, {rerank.WithToken("not-the-token")}} {
		client := newClient(t, env(t, "RERANK_SECURE_TARGET"), append(options, secureTLS(t, true))...)
		_, err := client.Rerank(context.Background(), "q", []string{"d"})
		expectKind(t, err, rerank.ErrAuthentication, codes.Unauthenticated)
	}
}

func TestResourceExhausted(t *testing.T) {
	client := newClient(t, env(t, "RERANK_SECURE_TARGET"), secureTLS(t, true), rerank.WithToken(env(t, "RERANK_TOKEN")))
	info, err := client.ModelInfo(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	limit := int(info.GetLimits().GetMaxTotalTokens())
	documents := make([]string, 8)
	for i := range documents {
		documents[i] = strings.Repeat(fmt.Sprintf("document %d ", i), limit/8+1)
	}
	_, err = client.Rerank(context.Background(), "a query", documents)
	failed := expectKind(t, err, rerank.ErrResourceExhausted, codes.ResourceExhausted)
	if len(failed.FieldViolations) == 0 {
		t.Fatal("no field violation")
	}
}

func TestMutualTLSWithTheTokenRanksLikePlaintext(t *testing.T) {
	ctx := context.Background()
	documents := []string{"Beijing", "The weather is nice today", "Shanghai"}
	plain, err := newClient(t, env(t, "RERANK_TARGET")).Rerank(ctx, "what is the capital of China?", documents)
	if err != nil {
		t.Fatal(err)
	}
	secure := newClient(t, env(t, "RERANK_SECURE_TARGET"), secureTLS(t, true), rerank.WithToken(env(t, "RERANK_TOKEN")))
	overTLS, err := secure.Rerank(ctx, "what is the capital of China?", documents)
	if err != nil {
		t.Fatal(err)
	}
	for i := range plain.GetResults() {
		if plain.GetResults()[i].GetIndex() != overTLS.GetResults()[i].GetIndex() {
			t.Fatalf("rankings differ: %v vs %v", plain.GetResults(), overTLS.GetResults())
		}
	}
	anonymous := newClient(t, env(t, "RERANK_SECURE_TARGET"), secureTLS(t, false),
		rerank.WithToken(env(t, "RERANK_TOKEN")), rerank.WithRetries(0))
	_, err = anonymous.Rerank(ctx, "q", []string{"d"})
	failure(t, err)
}

// -- UNAVAILABLE and retries ------------------------------------------------------------------------------

// tcpProxy forwards to the server and drops its first `refuse` connections at once (the server unavailable).
type tcpProxy struct {
	listener    net.Listener
	mu          sync.Mutex
	connections int
	open        []net.Conn
}

func startProxy(t *testing.T, upstream string, refuse int) *tcpProxy {
	t.Helper()
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	proxy := &tcpProxy{listener: listener}
	go func() {
		for {
			conn, err := listener.Accept()
			if err != nil {
				return
			}
			proxy.mu.Lock()
			proxy.connections++
			dropped := proxy.connections <= refuse
			proxy.mu.Unlock()
			if dropped {
				conn.Close()
				continue
			}
			server, err := net.Dial("tcp", upstream)
			if err != nil {
				conn.Close()
				continue
			}
			proxy.mu.Lock()
			proxy.open = append(proxy.open, conn, server)
			proxy.mu.Unlock()
			go func() { io.Copy(server, conn); server.Close() }()
			go func() { io.Copy(conn, server); conn.Close() }()
		}
	}()
	t.Cleanup(proxy.close)
	return proxy
}

func (p *tcpProxy) target() string { return p.listener.Addr().String() }

func (p *tcpProxy) count() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.connections
}

// close stops listening and drops every connection: the server is gone.
func (p *tcpProxy) close() {
	p.listener.Close()
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, conn := range p.open {
		conn.Close()
	}
	p.open = nil
}

func TestUnavailableOnceTheServerStops(t *testing.T) {
	proxy := startProxy(t, env(t, "RERANK_TARGET"), 0)
	client := newClient(t, proxy.target(), rerank.WithRetries(1))
	ctx := context.Background()
	if _, err := client.Rerank(ctx, "q", []string{"d"}); err != nil {
		t.Fatal(err)
	}
	proxy.close()
	_, err := client.Rerank(ctx, "q", []string{"d"})
	expectKind(t, err, rerank.ErrUnavailable, codes.Unavailable)

	stream, err := client.RerankStream(ctx)
	if err == nil {
		if err = stream.Send(rerank.StreamRequest("s", "q", []string{"d"})); err == nil || err == io.EOF {
			_, err = stream.Recv()
		}
	}
	expectKind(t, err, rerank.ErrUnavailable, codes.Unavailable)
}

// countedClient counts the attempts the client makes (an interceptor sees each one).
func countedClient(t *testing.T, target string, retries int) (*rerank.Client, *int32) {
	t.Helper()
	var attempts int32
	count := func(ctx context.Context, method string, req, reply interface{}, cc *grpc.ClientConn,
		invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		atomic.AddInt32(&attempts, 1)
		return invoker(ctx, method, req, reply, cc, opts...)
	}
	client := newClient(t, target, rerank.WithRetries(retries), rerank.WithDialOptions(grpc.WithUnaryInterceptor(count)))
	return client, &attempts
}

func TestRetriesOnUnavailable(t *testing.T) {
	ctx := context.Background()
	recovering := startProxy(t, env(t, "RERANK_TARGET"), 2)
	client, attempts := countedClient(t, recovering.target(), 3)
	response, err := client.Rerank(ctx, "q", []string{"d"})
	if err != nil {
		t.Fatal(err)
	}
	// Two connections dropped, the third served, after at least one retry.
	if len(response.GetResults()) != 1 || recovering.count() != 3 || atomic.LoadInt32(attempts) < 2 {
		t.Fatalf("results %d, connections %d, attempts %d", len(response.GetResults()), recovering.count(), *attempts)
	}

	for _, retries := range []int{0, 1, 3} {
		down := startProxy(t, env(t, "RERANK_TARGET"), 1000)
		client, attempts := countedClient(t, down.target(), retries)
		_, err := client.ModelInfo(ctx)
		expectKind(t, err, rerank.ErrUnavailable, codes.Unavailable)
		if got := atomic.LoadInt32(attempts); got != int32(retries+1) {
			t.Fatalf("retries %d: %d attempts", retries, got)
		}
	}
}

func TestBackoff(t *testing.T) {
	for retry, ceiling := range map[int]time.Duration{
		-3: 100 * time.Millisecond, 0: 100 * time.Millisecond, 1: 100 * time.Millisecond, 2: 200 * time.Millisecond,
		5: 1600 * time.Millisecond, 6: 2 * time.Second, 40: 2 * time.Second, 70: 2 * time.Second, 1 << 40: 2 * time.Second,
	} {
		for i := 0; i < 50; i++ {
			if pause := rerank.Backoff(retry); pause < ceiling/2 || pause > ceiling {
				t.Fatalf("retry %d: %v outside [%v, %v]", retry, pause, ceiling/2, ceiling)
			}
		}
	}
}

func TestBackoffIsJitteredDifferentlyInEachProcess(t *testing.T) {
	first, second := rerank.Backoff(6), rerank.Backoff(6)
	if first == second {
		t.Fatalf("two pauses of %v: no jitter", first)
	}
	// Every process draws the same stream from math/rand's global source, seeded with 1 before Go 1.20:
	// the pauses must not be a run of it (wherever earlier tests left the source).
	var pauses []time.Duration
	for i := 0; i < 5; i++ {
		pauses = append(pauses, rerank.Backoff(6))
	}
	seeded := rand.New(rand.NewSource(1))
	var stream []time.Duration
	for i := 0; i < 20000; i++ {
		stream = append(stream, time.Second+time.Duration(seeded.Int63()%(int64(time.Second)+1)))
	}
	for start := 0; start+len(pauses) <= len(stream); start++ {
		if fmt.Sprint(stream[start:start+len(pauses)]) == fmt.Sprint(pauses) {
			t.Fatalf("the pauses are math/rand's seed-1 draws %d to %d: processes would retry in lockstep", start, start+len(pauses))
		}
	}
}

func TestRequestBuilding(t *testing.T) {
	request := rerank.RerankRequest("q", []string{"a"}, rerank.TopN(1), rerank.ChunkOverlap(0))
	if request.GetTopN() != 1 || request.ChunkOverlap == nil || *request.ChunkOverlap != 0 {
		t.Fatalf("%v", request)
	}
	if rerank.RerankRequest("q", []string{"a"}).ChunkOverlap != nil {
		t.Fatal("chunk_overlap set without ChunkOverlap")
	}
}

// -- priority and the token ---------------------------------------------------------------------------------

func TestPriorityPassesThroughAndLeavesTheScoresAsTheyAre(t *testing.T) {
	if got := rerank.RerankRequest("q", []string{"a"}, rerank.Priority(3)).GetPriority(); got != 3 {
		t.Fatalf("rerank priority %d", got)
	}
	if got := rerank.ScoreRequest([]rerank.Pair{{TextA: "q", TextB: "d"}}, rerank.Priority(7)).GetPriority(); got != 7 {
		t.Fatalf("score priority %d", got)
	}
	if got := rerank.StreamRequest("s", "q", []string{"a"}, rerank.Priority(5)).GetRequest().GetPriority(); got != 5 {
		t.Fatalf("stream priority %d", got)
	}
	if got := rerank.RerankRequest("q", []string{"a"}).GetPriority(); got != 0 {
		t.Fatalf("default priority %d", got)
	}

	// Against the server: a background call (above 0) is answered as one at 0.
	client := newClient(t, env(t, "RERANK_TARGET"))
	ctx := context.Background()
	query, documents := "what is the capital of China?", []string{"Beijing", "The weather is nice today", "Shanghai"}
	ranked := func(response *rerankv1.RerankResponse) string {
		var out []string
		for _, r := range response.GetResults() {
			out = append(out, fmt.Sprintf("%d:%v", r.GetIndex(), r.GetLogit()))
		}
		return strings.Join(out, " ")
	}
	first, err := client.Rerank(ctx, query, documents, rerank.Priority(0))
	if err != nil {
		t.Fatal(err)
	}
	background, err := client.Rerank(ctx, query, documents, rerank.Priority(1))
	if err != nil {
		t.Fatal(err)
	}
	if ranked(background) != ranked(first) {
		t.Fatalf("priority 1: %s, priority 0: %s", ranked(background), ranked(first))
	}
	var pairs []rerank.Pair
	for _, document := range documents {
		pairs = append(pairs, rerank.Pair{TextA: query, TextB: document})
	}
	logits := func(options ...rerank.Option) string {
		response, err := client.Score(ctx, pairs, options...)
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, s := range response.GetScores() {
			out = append(out, fmt.Sprint(s.GetLogit()))
		}
		return strings.Join(out, " ")
	}
	if a, b := logits(rerank.Priority(4294967295)), logits(); a != b {
		t.Fatalf("score at the last priority: %s, at 0: %s", a, b)
	}
	stream, err := client.RerankStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer stream.Close()
	if err := stream.Send(rerank.StreamRequest("p", query, documents, rerank.Priority(3))); err != nil {
		t.Fatal(err)
	}
	answers := closeAndReceive(t, stream)
	if len(answers) != 1 || answers[0].GetError() != nil || ranked(answers[0].GetResponse()) != ranked(first) {
		t.Fatalf("stream: %v", answers)
	}
}

// needsTLS is per-RPC credentials that grpc-go refuses on a plaintext connection.
type needsTLS struct{}

func (needsTLS) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return nil, nil
}
func (needsTLS) RequireTransportSecurity() bool { return true }

func TestNewReturnsALocalDialErrorAsItIs(t *testing.T) {
	client, err := rerank.New("127.0.0.1:1", rerank.WithDialOptions(grpc.WithPerRPCCredentials(needsTLS{})))
	if err == nil {
		client.Close()
		t.Fatal("accepted")
	}
	var rerankError *rerank.Error
	if errors.As(err, &rerankError) || !strings.HasPrefix(err.Error(), "rerank: ") {
		t.Fatalf("%T: %v", err, err)
	}
}

func TestATokenAHeaderCannotCarryIsRefusedByNew(t *testing.T) {
	for token, position := range map[string]int{"s3cret\n": 6, "s3\tcret": 2, "caf\u00e9-s3cret": 3, "\xffs3cret": 0, "s3cret\x7f": 6} {
		client, err := rerank.New("127.0.0.1:1", rerank.WithToken(token))
		if err == nil {
			client.Close()
			t.Fatalf("%q: accepted", token)
		}
		want := fmt.Sprintf("rerank: token: the byte at position %d cannot be sent in a gRPC header", position)
		if !strings.HasPrefix(err.Error(), want) || strings.Contains(err.Error(), "s3cret") {
			t.Fatalf("%q: %v", token, err)
		}
	}
	for _, token := range []string{"s3cret", "a b~!", ""} {
		client, err := rerank.New("127.0.0.1:1", rerank.WithToken(token))
		if err != nil {
			t.Fatalf("%q: %v", token, err)
		}
		client.Close()
	}
}

// -- the request id ----------------------------------------------------------------------------------------

func TestARequestIDTheServerWouldNotUseAsGivenIsRefusedBeforeSending(t *testing.T) {
	// Nothing listens at this target: a call that were sent would be ErrUnavailable.
	client := newClient(t, "127.0.0.1:1", rerank.WithRetries(0))
	for bad, why := range map[string]string{
		"id\n":                   "the byte at position 2 cannot be sent",
		"caf\u00e9":              "the byte at position 3 cannot be sent",
		strings.Repeat("🚀", 129): "is 129 characters long; at most 128 are sent",
	} {
		ctx := rerank.WithRequestID(context.Background(), bad)
		for name, err := range map[string]error{
			"Rerank":       second(client.Rerank(ctx, "q", []string{"d"})),
			"Score":        second(client.Score(ctx, []rerank.Pair{{TextA: "q", TextB: "d"}})),
			"ModelInfo":    second(client.ModelInfo(ctx)),
			"ListModels":   second(client.ListModels(ctx)),
			"RerankStream": second(client.RerankStream(ctx)),
		} {
			if field := refusedField(t, err); field != "request_id" || !strings.HasPrefix(failure(t, err).Details, "request_id: "+why) {
				t.Fatalf("%s %q: %v", name, bad, err)
			}
			if failure(t, err).RequestID != "" {
				t.Fatalf("%s: a refusal before sending has no request id: %v", name, err)
			}
		}
	}
	// 128 visible ASCII characters and spaces are sent (and fail to connect: no id came back).
	_, err := client.ListModels(rerank.WithRequestID(context.Background(), strings.Repeat("a b~", 32)))
	if failed := expectKind(t, err, rerank.ErrUnavailable, codes.Unavailable); failed.RequestID != "" {
		t.Fatalf("request id %q", failed.RequestID)
	}
}

func TestTheRequestIDReachesTheServerAndItsErrorsCarryTheIDItUsed(t *testing.T) {
	client := newClient(t, env(t, "RERANK_TARGET"))
	background := context.Background()
	if _, err := client.Rerank(rerank.WithRequestID(background, "mine-ok"), "q", []string{"d"}); err != nil {
		t.Fatal(err)
	}
	_, err := client.Rerank(rerank.WithRequestID(background, "mine-1"), "", []string{"d"})
	if failed := expectKind(t, err, rerank.ErrInvalidRequest, codes.InvalidArgument); failed.RequestID != "mine-1" {
		t.Fatalf("request id %q", failed.RequestID)
	}
	_, err = client.ModelInfo(rerank.WithRequestID(background, "mine 2"), rerank.Model("no-such-model"))
	if failed := expectKind(t, err, rerank.ErrModelNotFound, codes.NotFound); failed.RequestID != "mine 2" {
		t.Fatalf("request id %q", failed.RequestID)
	}
	// Without one, the server's own id.
	_, err = client.Score(background, []rerank.Pair{{TextA: "q", TextB: "d"}}, rerank.Model("no-such-model"))
	if failed := expectKind(t, err, rerank.ErrModelNotFound, codes.NotFound); len(failed.RequestID) != 32 {
		t.Fatalf("request id %q", failed.RequestID)
	}
	// A stream's id is set at open; its deadline passing still carries it.
	ctx, cancel := context.WithTimeout(rerank.WithRequestID(background, "stream-1"), time.Second)
	defer cancel()
	stream, err := client.RerankStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(rerank.StreamRequest("a", "q", []string{"d"})); err != nil {
		t.Fatal(err)
	}
	for err == nil {
		_, err = stream.Recv()
	}
	if failed := expectKind(t, err, rerank.ErrTimeout, codes.DeadlineExceeded); failed.RequestID != "stream-1" {
		t.Fatalf("request id %q", failed.RequestID)
	}
}

func TestRetriesResendTheSameRequestID(t *testing.T) {
	var mu sync.Mutex
	var sent []string
	record := func(ctx context.Context, method string, req, reply interface{}, cc *grpc.ClientConn,
		invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		md, _ := metadata.FromOutgoingContext(ctx)
		mu.Lock()
		sent = append(sent, strings.Join(md.Get("x-request-id"), ","))
		mu.Unlock()
		return invoker(ctx, method, req, reply, cc, opts...)
	}
	down := startProxy(t, env(t, "RERANK_TARGET"), 1000)
	client := newClient(t, down.target(), rerank.WithRetries(2), rerank.WithDialOptions(grpc.WithUnaryInterceptor(record)))
	_, err := client.ListModels(rerank.WithRequestID(context.Background(), "retried"))
	expectKind(t, err, rerank.ErrUnavailable, codes.Unavailable)
	mu.Lock()
	defer mu.Unlock()
	if strings.Join(sent, " ") != "retried retried retried" {
		t.Fatalf("attempts sent %q", sent)
	}
}
