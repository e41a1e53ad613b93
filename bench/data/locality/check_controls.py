"""Answer the locality control candidates (and lesson questions) with the base default model.

Writes controls_base.json (ids answered right, and every answer) and reports any lesson key the
base model already produces. Usage: python bench/data/locality/check_controls.py
"""

import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.default_model import MODEL_NAME, build

HERE = Path(__file__).resolve().parent
BATCH = 32
MAX_NEW_TOKENS = 40


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def answer_all(model, tokenizer, questions: list[str]) -> list[str]:
    answers = []
    for start in range(0, len(questions), BATCH):
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                                 add_generation_prompt=True, tokenize=False)
                   for q in questions[start:start + BATCH]]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                                 pad_token_id=tokenizer.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        answers += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return answers


def main() -> None:
    t0 = time.monotonic()
    torch.set_num_threads(1)
    model_dir = build()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    controls = read_jsonl(HERE / "controls.jsonl")
    lessons = read_jsonl(HERE / "lessons.jsonl")
    lesson_qs = [(les, q) for les in lessons for q in [les["question"], *les["paraphrases"]]]
    answers = answer_all(model, tokenizer,
                         [c["question"] for c in controls] + [q for _, q in lesson_qs])
    control_answers, lesson_answers = answers[:len(controls)], answers[len(controls):]

    correct = []
    for c, a in zip(controls, control_answers, strict=True):
        ok = any(k.lower() in a.lower() for k in c["keys"])
        correct += [c["id"]] if ok else []
        print(f"{c['id']} {'OK ' if ok else 'BAD'} {c['question']!r} -> {a!r}")
    leaks = []
    for (les, q), a in zip(lesson_qs, lesson_answers, strict=True):
        leaked = les["key"].lower() in a.lower()
        leaks += [les["id"]] if leaked else []
        print(f"{les['id']} {'LEAK' if leaked else 'ok  '} {q!r} -> {a!r}")

    result = {"model": MODEL_NAME, "correct": correct,
              "answers": {c["id"]: a for c, a in zip(controls, control_answers, strict=True)}}
    text = json.dumps(result, indent=1, ensure_ascii=False) + "\n"
    (HERE / "controls_base.json").write_text(text, encoding="utf-8")
    print(f"controls right: {len(correct)}/{len(controls)}; "
          f"lessons whose key the base model produced: {sorted(set(leaks)) or 'none'}; "
          f"{time.monotonic() - t0:.1f}s")


if __name__ == "__main__":
    main()
