"""vLLM's offline engine (real engine core and CPU worker, our plugin loaded from the entry
point) serving a tiny model for tests, driven over stdin/stdout. Token ids in, log-probs out:
the tiny models have no tokenizer (``skip_tokenizer_init``).

    python tests/support/vllm_host_child.py MODEL_DIR [TP]   (VLLM_APOLLO_EXPORT_DIR: exports)

One process (engine core and worker in-process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the
"uni" executor) to keep each start short; with TP > 1, one worker process per rank ("mp").
vLLM logs go to stderr (``VLLM_LOGGING_STREAM``), the answers to stdout.

Commands (one JSON line each): ``{"ids": [...]}`` answers a JSON line
``{"prompt": [[logprob of every vocab id] per position 1..n-1], "next": [... for the next
token]}``; ``{"quit": true}`` exits.
"""

import json
import sys

from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt


def main() -> None:
    model_dir = sys.argv[1]
    tp = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    config = json.load(open(f"{model_dir}/config.json"))
    vocab = config.get("text_config", config)["vocab_size"]
    llm = LLM(model=model_dir, skip_tokenizer_init=True, enforce_eager=True, dtype="float32",
              max_model_len=256, max_logprobs=vocab, seed=0, tensor_parallel_size=tp,
              distributed_executor_backend="uni" if tp == 1 else "mp")
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=vocab,
                            prompt_logprobs=vocab, detokenize=False)

    def dense(row) -> list[float]:
        out = [float("-inf")] * vocab
        for token, lp in row.items():
            out[token] = lp.logprob
        return out

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("quit"):
            break
        result = llm.generate([TokensPrompt(prompt_token_ids=request["ids"])], params,
                              use_tqdm=False)[0]
        print(json.dumps({"prompt": [dense(r) for r in result.prompt_logprobs[1:]],
                          "next": dense(result.outputs[0].logprobs[0])}), flush=True)


if __name__ == "__main__":
    main()
