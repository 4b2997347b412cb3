"""`telechat2 eval`: perplexity, multiple-choice log-likelihood accuracy, generation with exact match.

    perplexity  exp(total next-token loss / counted tokens), the training loss (`model.loss_sum`,
                `label_count`) over a `telechat2 preprocess` folder or a pretrain jsonl.
    choice      C-Eval / CMMLU / MMLU style files (question, A-D, answer), k-shot prompts from a dev split,
                scored as lm-evaluation-harness scores `acc`: the sum of the log-probabilities of each
                choice's continuation given the prompt, argmax; accuracy per subject and overall.
    generate    GSM8K-style: greedy replies through `model.generate`, the last number of the reply against
                the gold answer (after `####`, else its last number), exact match.

Every input is read and checked (file:line, missing columns) before the model is loaded; results are written
as JSON and Markdown. Single device only for now (tensor-parallel inference lives in `infer/`).
"""
