// Command example reranks documents from the command line and shows how each kind of failure reads. From
// client/go, in GOPATH mode (docs/sdk-go.md#install; without a module proxy), or without GO111MODULE=off
// after `go mod tidy` where a proxy is reachable:
//
//	GO111MODULE=off go run ./example -target localhost:50051 "what is the capital of China?" "Beijing" "The weather is nice today"
//
// -token sends a bearer token, -ca turns on TLS with that CA (-cert and -key add a client certificate).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/rerank-service/rerank-service/client/go/rerank"
)

func main() {
	target := flag.String("target", "localhost:50051", "the service, host:port")
	token := flag.String("token", "", "bearer token")
	ca := flag.String("ca", "", "CA file: turns on TLS")
	cert := flag.String("cert", "", "client certificate file (mTLS)")
	key := flag.String("key", "", "client key file (mTLS)")
	topN := flag.Uint("top-n", 0, "only the best n results (0: all)")
	flag.Parse()
	if flag.NArg() < 2 {
		fmt.Fprintln(os.Stderr, "usage: example [flags] QUERY DOCUMENT...")
		os.Exit(2)
	}

	options := []rerank.ClientOption{rerank.WithTimeout(10 * time.Second), rerank.WithToken(*token)}
	if *ca != "" {
		config, err := rerank.TLSConfig(*ca, *cert, *key)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		options = append(options, rerank.WithTLS(config))
	}
	client, err := rerank.New(*target, options...)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer client.Close()

	response, err := client.Rerank(context.Background(), flag.Arg(0), flag.Args()[1:],
		rerank.TopN(uint32(*topN)), rerank.ReturnDocuments())
	var failed *rerank.Error
	switch {
	case err == nil:
		for _, result := range response.GetResults() {
			fmt.Printf("%.4f  %s\n", result.GetScore(), result.GetDocument())
		}
		fmt.Printf("%d tokens, model %s\n", response.GetUsage().GetInputTokens(), response.GetModel())
		return
	case errors.Is(err, rerank.ErrInvalidRequest) && errors.As(err, &failed):
		for _, violation := range failed.FieldViolations {
			fmt.Fprintf(os.Stderr, "%s: %s\n", violation.GetField(), violation.GetDescription())
		}
	case errors.Is(err, rerank.ErrResourceExhausted), errors.Is(err, rerank.ErrUnavailable):
		fmt.Fprintf(os.Stderr, "try again later: %v\n", err)
	default:
		fmt.Fprintln(os.Stderr, err)
	}
	os.Exit(1)
}
