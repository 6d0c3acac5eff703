"""Calling LLM providers over the OpenAI wire protocol, shared by inference and the
router's `llm` classifier: the model registry, retries with backoff, fallbacks,
cool-downs, token counting. It knows nothing of the services that use it."""
