// Rerank documents from the command line, and show how each kind of failure reads:
//
//   npm run build && npm run build:test
//   node build/examples/rerank.js localhost:50051 "what is the capital of China?" "Beijing" "The weather is nice today"
//
// Options through the environment: RERANK_TOKEN (a bearer token), RERANK_CA (a CA file: TLS).

import {
  InvalidRequestError,
  RerankClient,
  RerankError,
  ResourceExhaustedError,
  tlsCredentials,
  UnavailableError,
} from "@rerank-service/client";

const [target, query, ...documents] = process.argv.slice(2);
// An empty query is the server's to refuse: it shows how an InvalidRequestError reads.
if (!target || query === undefined || documents.length === 0) {
  console.error("usage: rerank.js HOST:PORT QUERY DOCUMENT...");
  process.exit(2);
}

const client = new RerankClient(target, {
  timeoutMs: 10_000,
  token: process.env.RERANK_TOKEN,
  credentials: process.env.RERANK_CA ? tlsCredentials({ rootCertificates: process.env.RERANK_CA }) : undefined,
});
try {
  const response = await client.rerank(query, documents, { returnDocuments: true });
  for (const result of response.results) {
    console.log(`${result.score.toFixed(4)}  ${result.document}`);
  }
  console.log(`${response.usage?.inputTokens} tokens, model ${response.model}`);
} catch (error) {
  if (error instanceof InvalidRequestError) {
    for (const violation of error.fieldViolations) console.error(`${violation.field}: ${violation.description}`);
  } else if (error instanceof ResourceExhaustedError || error instanceof UnavailableError) {
    console.error(`try again later: ${error.message}`);
  } else if (error instanceof RerankError) {
    console.error(error.message);
  } else {
    throw error;
  }
  process.exitCode = 1;
} finally {
  client.close();
}
