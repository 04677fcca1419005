"""lanes: engines that are not ours, run on a slice (`lanes.vllm`: vLLM started, supervised and stopped from a
perf plan). External OpenAI-compatible upstreams are reached through `matrixstack.openai.client`."""
