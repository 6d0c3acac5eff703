// A Node.js gRPC client of costmesh, used to check that a non-Python caller can
// talk to the mesh from the .proto files alone.
//
// Env: COSTMESH_ADDR (host:port, plaintext) and COSTMESH_API_KEY.
// Calls InferenceService/Complete twice with the same request (the second should
// be a cache hit), then LedgerService/QuerySpend grouped by feature, and prints
// one line of JSON: {"first": ..., "second": ..., "spend": ...}. Exits 0 on
// success; on any error prints it (code, details) to stderr and exits 1.

import { fileURLToPath } from "node:url";
import path from "node:path";
import process from "node:process";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const PROTO_ROOT = path.resolve(HERE, "..", "..", "protos");
const DEADLINE_MS = 10_000;

const LOADER_OPTIONS = {
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
  // Imports like "costmesh/types/v1/types.proto" resolve against protos/;
  // google/protobuf/*.proto (well-known types) come built into protobufjs.
  includeDirs: [PROTO_ROOT],
};

const REQUEST = {
  feature: "support",
  messages: [{ role: "ROLE_USER", content: "How do I reset my password? (from node)" }],
};

function fail(err) {
  const out = {
    error: err?.message ?? String(err),
    code: err?.code,
    codeName: typeof err?.code === "number" ? grpc.status[err.code] : undefined,
    details: err?.details,
  };
  process.stderr.write(`${JSON.stringify(out)}\n`);
  process.exitCode = 1;
}

function loadServices() {
  const definition = protoLoader.loadSync(
    ["costmesh/inference/v1/inference.proto", "costmesh/ledger/v1/ledger.proto"],
    LOADER_OPTIONS,
  );
  const pkg = grpc.loadPackageDefinition(definition);
  const InferenceService = pkg.costmesh?.inference?.v1?.InferenceService;
  const LedgerService = pkg.costmesh?.ledger?.v1?.LedgerService;
  if (typeof InferenceService !== "function" || typeof LedgerService !== "function") {
    throw new Error("costmesh services not found in the loaded protos");
  }
  return { InferenceService, LedgerService };
}

function unary(client, method, request, metadata) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + DEADLINE_MS);
    client[method](request, metadata, { deadline }, (err, response) => {
      if (err) reject(err);
      else resolve(response);
    });
  });
}

async function main() {
  const addr = process.env.COSTMESH_ADDR;
  const apiKey = process.env.COSTMESH_API_KEY;
  if (!addr) throw new Error("COSTMESH_ADDR is not set (host:port)");
  if (!apiKey) throw new Error("COSTMESH_API_KEY is not set");

  const { InferenceService, LedgerService } = loadServices();
  const creds = grpc.credentials.createInsecure();
  const inference = new InferenceService(addr, creds);
  const ledger = new LedgerService(addr, creds);

  const metadata = new grpc.Metadata();
  metadata.set("authorization", `Bearer ${apiKey}`);

  try {
    const first = await unary(inference, "Complete", REQUEST, metadata);
    const second = await unary(inference, "Complete", REQUEST, metadata);
    const spend = await unary(ledger, "QuerySpend", { group_by: "GROUP_BY_FEATURE" }, metadata);
    process.stdout.write(`${JSON.stringify({ first, second, spend })}\n`);
  } finally {
    inference.close();
    ledger.close();
  }
}

// Set the exit code rather than calling process.exit(), so stdout is flushed first;
// both clients are closed, so nothing keeps the event loop alive.
main().then(
  () => {
    process.exitCode = 0;
  },
  (err) => fail(err),
);
