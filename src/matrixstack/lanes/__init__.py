"""lanes: engines that are not ours, run on a slice (`lanes.vllm`: vLLM started, supervised and stopped from a
perf plan; `lanes.vllm_env`: the venv of its own vLLM is installed in and found from). External OpenAI-compatible
upstreams are reached through `matrixstack.openai.client`."""
