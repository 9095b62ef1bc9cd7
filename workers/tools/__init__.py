"""Tool calling on the llama-cpp backend: what a request asks for, how the model is told, how its
output becomes OpenAI tool calls (`events` is the vocabulary every output format speaks)."""
