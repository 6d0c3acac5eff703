"""A loopback OpenAI look-alike (chat completions, embeddings, files, batches) that
reports usage and can inject errors and latency: for tests, benchmarks and the
keyless demo. It is a provider, not part of the mesh: the mesh's composition root
starts it and hands providers its base URL."""

from costmesh_simulator.server import OpenAISimulator, count_tokens

__all__ = ["OpenAISimulator", "count_tokens"]
