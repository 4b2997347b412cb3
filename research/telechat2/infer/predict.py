"""`telechat2 predict` and `telechat2 chat`: the run config, the checkpoint and the tokenizer around generate.

Inputs per line (jsonl): MindFormers' `{"input": "..."}` (one user turn) or TeleChat2's chat format
`{"system": ..., "dialog": [{"role": "user"|"bot"|"assistant"|"tool", "content": ...}, ...], "tools": [...]}`
ending with a user or tool turn. Every line is parsed and rendered before anything is generated; a bad line
stops the run naming file:line.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import warnings

from ..errors import TeleChat2Error
from ..ownership import check_output_file
from ..textio import check_utf8_str
from .distributed import ABORT, END, share_prompts
from .sampling import RELEASE_DEFAULTS, GenerationConfig

GENERATION_KEYS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens")


class PredictError(TeleChat2Error):
    """Bad predict input (file:line), a missing checkpoint or tokenizer, an over-long prompt with --refuse."""


def generation_config(cfg: dict, **overrides) -> GenerationConfig:
    """TeleChat2's release defaults <- generation keys of model.model_config <- command-line overrides."""
    mc = cfg["model"].get("model_config") or {}
    values = {**RELEASE_DEFAULTS, **{k: mc[k] for k in GENERATION_KEYS if k in mc}}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return GenerationConfig(**values, eos_token_id=mc.get("eos_token_id", 2), pad_token_id=mc.get("pad_token_id", 3))


def context_length(cfg: dict, model_cfg) -> int:
    """Prompt + new tokens allowed: model_config.max_decode_length (MindFormers) or seq_length."""
    return int((cfg["model"].get("model_config") or {}).get("max_decode_length") or model_cfg.seq_length)


def load_for_inference(cfg: dict, checkpoint: str | None, adapter: str | None = None):
    """(model, tokenizer, model config) with the checks done before any weight is read.

    Under msrun with model_parallel > 1 the model is built with the mesh and each rank reads only its block
    of every tensor (`load_weights` reads blocks from any checkpoint layout). `adapter`: a LoRA adapter (a LoRA
    run, an import-lora or a PEFT folder) attached, not merged, to the base `checkpoint`; its shapes are checked
    before the base is read, its recorded base fingerprint after. A w8a16 checkpoint (`telechat2
    convert quantize`) builds the model with int8 decoder linears (the returned config has its weight_quant)."""
    from ..checkpoint.load import load_weights
    from ..checkpoint.sources import open_checkpoint
    from ..model import TeleChat2ForCausalLM
    from ..tokenizer import TeleChat2Tokenizer
    from ..train.run_config import model_config
    from .distributed import inference_layout, inference_mesh
    model_cfg = model_config(cfg)
    layout = inference_layout(cfg, model_cfg)             # pp / cp / dp refused, tp constraints, msrun count
    path = checkpoint or cfg["load_checkpoint"]
    if not path:
        raise PredictError("no checkpoint: pass --checkpoint (or set load_checkpoint in the config)")
    if not os.path.exists(path):
        raise PredictError(f"checkpoint {path}: no such file or folder")
    vocab = cfg["processor"]["tokenizer"]["vocab_file"] or cfg["train_dataset"]["tokenizer"]
    if not vocab or not os.path.exists(vocab):
        raise PredictError(f"processor.tokenizer.vocab_file: {vocab or '(empty)'}: no such tokenizer.model")
    adapters = None
    if adapter:
        from ..checkpoint.adapters import check_adapter, open_adapter
        if not os.path.exists(adapter):
            raise PredictError(f"--adapter {adapter}: no such file or folder")
        adapters = open_adapter(adapter, model_cfg)
        check_adapter(adapters, model_cfg)
    source = open_checkpoint(path)                       # headers only; a w8a16 release builds int8 linears
    model_cfg = with_weight_quant(model_cfg, source)
    mesh = inference_mesh(cfg, layout)
    tokenizer = TeleChat2Tokenizer(vocab)
    from mindspore.nn.utils import no_init_parameters
    with no_init_parameters():          # every parameter comes from the checkpoint: no random init to allocate
        model = TeleChat2ForCausalLM(model_cfg, mesh)
    load_weights(model, path, base_only=adapters is not None, source=source)
    if adapters is not None:
        from ..checkpoint.adapters import use_adapter
        use_adapter(model, adapters, path)
    return model, tokenizer, model_cfg


def with_weight_quant(model_cfg, source):
    """The run's model config with the checkpoint's weight quantization (a w8a16 release describes itself);
    a run config asking for a quantization the checkpoint does not have is refused."""
    if model_cfg.weight_quant and model_cfg.weight_quant != source.weight_quant:
        raise PredictError(f"model_config.weight_quant {model_cfg.weight_quant}: checkpoint {source.path} is not a "
                           f"{model_cfg.weight_quant} release; make one with `telechat2 convert quantize`")
    return model_cfg.replace(weight_quant=source.weight_quant)


def conversation_of(obj) -> tuple[list[dict], list | None]:
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    head = [{"role": "system", "content": obj["system"]}] if obj.get("system") is not None else []
    if "dialog" in obj:
        if not isinstance(obj["dialog"], list) or not obj["dialog"]:
            raise ValueError("'dialog' must be a non-empty list of messages")
        messages = head + obj["dialog"]
    elif "input" in obj:
        if not isinstance(obj["input"], str):
            raise ValueError("'input' must be a string")
        messages = head + [{"role": "user", "content": obj["input"]}]
    else:
        raise ValueError("expected 'input' or 'dialog' (with optional 'system', 'tools')")
    from ..tokenizer.template import normalize_messages
    last = normalize_messages(messages)[-1]["role"]           # names a bad turn (unknown role, no content)
    if last not in ("user", "tool"):
        raise ValueError(f"the conversation must end with a user or tool turn to answer, not {last!r}")
    return messages, obj.get("tools") or None


def read_requests(path: str, tokenizer) -> list[dict]:
    """Every line rendered to prompt ids; errors name file:line."""
    requests = []
    try:
        fh = open(path, "rb")
    except OSError as e:
        raise PredictError(f"{path}: cannot open: {e.strerror}") from None
    with fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
                messages, tools = conversation_of(obj)
                ids = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
            except UnicodeDecodeError:
                raise PredictError(f"{path}:{lineno}: not UTF-8 text") from None
            except json.JSONDecodeError as e:
                raise PredictError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
            except (ValueError, TeleChat2Error) as e:
                raise PredictError(f"{path}:{lineno}: {e}") from None
            requests.append({"line": lineno, "prompt_ids": ids, "request": obj})
    if not requests:
        raise PredictError(f"{path}: no input lines")
    return requests


def fit_prompt(ids: list[int], limit: int, where: str, refuse: bool) -> list[int]:
    """Keep the last `limit` tokens (warning), or refuse an over-long prompt."""
    if len(ids) <= limit:
        return ids
    if refuse or limit <= 0:
        raise PredictError(f"{where}: prompt has {len(ids)} tokens, more than the {max(limit, 0)} that fit the context "
                           "with max_new_tokens")
    warnings.warn(f"{where}: prompt of {len(ids)} tokens truncated from the left to {limit}", stacklevel=2)
    return ids[-limit:]


def reply_of(tokenizer, new_ids: list[int], gen: GenerationConfig) -> dict:
    stops = {gen.eos_token_id, *gen.stop_token_ids}
    finish = "stop" if new_ids and new_ids[-1] in stops else "length"
    body = new_ids[:-1] if finish == "stop" else new_ids
    text = tokenizer.decode(body)
    out = {"text": text, "finish_reason": finish, "tool_calls": [], "tool_call_error": None}
    if "<tool_call>" in text or "</tool_call>" in text:
        try:
            parsed = tokenizer.parse_tool_calls(text)
            out["tool_calls"] = [{"name": c.name, "arguments": c.arguments} for c in parsed.tool_calls]
            out["content"] = parsed.content
        except TeleChat2Error as e:
            out["tool_call_error"] = str(e)
    return out


def predict(cfg: dict, *, checkpoint=None, prompt=None, input_file=None, output=None, force=False,
            batch_size=None, refuse_overlong=False, adapter=None, **gen_overrides) -> list[dict]:
    from tqdm import tqdm
    check_output(output, force, [("--input-file", input_file), ("--checkpoint", checkpoint or cfg["load_checkpoint"]),
                                 ("--adapter", adapter)])
    if prompt is not None:
        check_utf8_str(prompt, "--prompt")
    gen_check = generation_config(cfg, **gen_overrides)
    check_context(cfg, gen_check)
    model, tokenizer, model_cfg = load_for_inference(cfg, checkpoint, adapter)
    gen = generation_config(cfg, vocab_limit=tokenizer.vocab_size, **gen_overrides)
    mesh = model.mesh
    if mesh.rank == 0:                  # rank 0 reads the input; under tp the others receive its prompt ids
        try:
            requests = prompt_requests(cfg, model_cfg, tokenizer, gen, prompt, input_file, refuse_overlong)
        except TeleChat2Error:
            share_prompts(mesh, ABORT)
            raise
        share_prompts(mesh, [r["prompt_ids"] for r in requests])
    else:
        requests = [{"line": None, "prompt_ids": p, "request": None} for p in share_prompts(mesh, None)]
    bs = batch_size or cfg["runner_config"]["batch_size"]
    results, batches = [], []
    for start in tqdm(range(0, len(requests), bs), desc="predict", unit="batch", file=sys.stderr,
                      disable=len(requests) <= bs or mesh.rank != 0):
        chunk = requests[start:start + bs]
        timings = {}
        seqs = model.generate([r["prompt_ids"] for r in chunk], timings=timings, **vars(gen))
        rows = []
        for r, seq, row_s in zip(chunk, seqs, timings["row_s"]):
            new = seq[len(r["prompt_ids"]):]
            rows.append({"line": r["line"], **reply_of(tokenizer, new, gen), "prompt_tokens": len(r["prompt_ids"]),
                         "completion_tokens": len(new), "time_to_first_token_s": timings["first_token_s"],
                         "total_s": row_s, "tokens_per_s": len(new) / row_s if row_s else 0.0,
                         "batch": len(batches)})
        results += rows
        batches.append(batch_report(len(batches), rows, timings))
    report = throughput_report(batches, mesh.tp, model_cfg.weight_quant)
    if mesh.rank == 0:
        print_throughput(report)
    if output and mesh.rank == 0:
        write_results(output, results)
        write_text(throughput_path(output), json.dumps(report, indent=1) + "\n", "--output")
    return results


def prompt_requests(cfg, model_cfg, tokenizer, gen, prompt, input_file, refuse_overlong) -> list[dict]:
    """The prompt ids of --prompt or of every line of --input-file, fitted to the context."""
    if prompt is not None:
        requests = [{"line": None, "prompt_ids": tokenizer.apply_chat_template([{"role": "user", "content": prompt}]),
                     "request": {"input": prompt}}]
    else:
        requests = read_requests(input_file, tokenizer)
    limit = context_length(cfg, model_cfg) - gen.max_new_tokens
    for r in requests:
        where = f"{input_file}:{r['line']}" if r["line"] else "--prompt"
        r["prompt_ids"] = fit_prompt(r["prompt_ids"], limit, where, refuse_overlong)
    return requests


def throughput_path(output: str) -> str:
    """Where predict writes its throughput report: beside the results, `OUT.throughput.json` (OUT without its
    extension)."""
    return os.path.splitext(output)[0] + ".throughput.json"


def batch_report(index: int, rows: list[dict], timings: dict) -> dict:
    """Throughput of one generate call: aggregate tokens/s (all new tokens / the call's time), each request's
    tokens/s (its new tokens / the time until it stopped), time to first token (prefill + first choice)."""
    total = timings["total_s"]
    tokens = sum(r["completion_tokens"] for r in rows)
    per_request = [{"line": r["line"], "completion_tokens": r["completion_tokens"], "total_s": r["total_s"],
                    "tokens_per_s": r["tokens_per_s"]} for r in rows]
    return {"batch": index, "requests": len(rows), "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
            "completion_tokens": tokens, "prefill_s": timings["prefill_s"],
            "time_to_first_token_s": timings["first_token_s"], "total_s": total,
            "includes_compilation": timings["compiled"],
            "tokens_per_s": tokens / total if total else 0.0,
            "tokens_per_s_per_request": sum(r["tokens_per_s"] for r in per_request) / len(rows),
            "per_request": per_request}


def throughput_report(batches: list[dict], tp: int, weight_quant: str | None) -> dict:
    """The whole run: the batches and their totals (tokens/s = all new tokens / the summed generate time)."""
    tokens, secs = sum(b["completion_tokens"] for b in batches), sum(b["total_s"] for b in batches)
    return {"model_parallel": tp, "weight_quant": weight_quant, "requests": sum(b["requests"] for b in batches),
            "completion_tokens": tokens, "total_s": secs, "tokens_per_s": tokens / secs if secs else 0.0,
            "batches": batches}


def print_throughput(report: dict) -> None:
    """One stderr line per batch and a total (stdout keeps the jsonl results)."""
    batches = report["batches"]
    for b in batches:
        rates = ", ".join(f"{r['tokens_per_s']:.1f}" for r in b["per_request"])
        print(f"[telechat2] predict batch {b['batch']}: {b['requests']} request(s), {b['completion_tokens']} new "
              f"tokens in {b['total_s']:.2f} s: {b['tokens_per_s']:.1f} tokens/s aggregate, "
              f"{b['tokens_per_s_per_request']:.1f} tokens/s per request (mean; "
              f"{rates}), time to first token "
              f"{b['time_to_first_token_s']:.3f} s" + (" (includes graph compilation)" if b["includes_compilation"]
                                                       else ""), file=sys.stderr)
    if len(batches) > 1 and report["total_s"]:
        print(f"[telechat2] predict total: {report['completion_tokens']} new tokens in {report['total_s']:.2f} s: "
              f"{report['tokens_per_s']:.1f} tokens/s (model_parallel {report['model_parallel']})", file=sys.stderr)


def write_results(output: str, results: list[dict]) -> None:
    write_text(output, "".join(json.dumps(res, ensure_ascii=False) + "\n" for res in results), "--output")


def write_text(path: str, text: str, option: str) -> None:
    """Write `path` atomically (a temporary file beside it, then renamed)."""
    fd, tmp = tempfile.mkstemp(prefix=".predict-", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except OSError as e:
        os.unlink(tmp) if os.path.exists(tmp) else None
        raise PredictError(f"{option} {path}: cannot write the results: {e.strerror or e}") from None


def check_output(output: str | None, force: bool, inputs) -> None:
    """Before anything is generated: --output is a file we may write (never a folder, never an input)."""
    if not output:
        return
    check_output_file(output, force, inputs, folder_hint="; give a file name for the jsonl results")
    check_output_file(throughput_path(output), force, inputs, folder_hint=" (predict writes its throughput "
                      "report there, beside --output)")


def check_context(cfg: dict, gen: GenerationConfig) -> None:
    """max_new_tokens must leave room for a prompt in the context."""
    from ..train.run_config import model_config
    ctx = context_length(cfg, model_config(cfg))
    if gen.max_new_tokens >= ctx:
        raise PredictError(f"max_new_tokens {gen.max_new_tokens} leaves no room for a prompt in the context of "
                           f"{ctx} tokens (model_config.max_decode_length or seq_length); use at most {ctx - 1}")


def chat(cfg: dict, *, checkpoint=None, system=None, stdin=None, stdout=None, adapter=None, **gen_overrides) -> None:
    """Multi-turn chat on stdin/stdout: /reset, /system TEXT, /exit. Replies stream as they are generated.
    The oldest turns are dropped when the conversation no longer fits the context."""
    stdin, stdout = stdin or sys.stdin.buffer, stdout or sys.stdout
    if system is not None:
        check_utf8_str(system, "--system")
    check_context(cfg, generation_config(cfg, **gen_overrides))
    model, tokenizer, model_cfg = load_for_inference(cfg, checkpoint, adapter)
    gen = generation_config(cfg, vocab_limit=tokenizer.vocab_size, **gen_overrides)
    limit = context_length(cfg, model_cfg) - gen.max_new_tokens
    mesh = model.mesh
    if mesh.rank != 0:                  # under tp: the turns rank 0 reads from stdin, until it ends
        while (prompts := share_prompts(mesh, None)) is not None:
            model.generate(prompts, **vars(gen))
        return
    try:
        history: list[dict] = []
        interactive = stdin.isatty()
        lineno = 0
        while True:
            if interactive:
                stdout.write("user> ")
                stdout.flush()
            line = stdin.readline()
            if not line:
                break
            lineno += 1
            if isinstance(line, bytes):            # a byte that is not UTF-8: this line is refused, the session goes on
                try:
                    line = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    print(f"telechat2 chat: error: input line {lineno}: not UTF-8 text (byte 0x{line[e.start]:02x} at "
                          f"offset {e.start}); line ignored", file=sys.stderr)
                    continue
            text = line.rstrip("\r\n")
            if not text.strip():
                continue
            if text.strip() in ("/exit", "/quit"):
                break
            if text.strip() == "/reset":
                history = []
                stdout.write("[history cleared]\n")
                continue
            if text.startswith("/system") and (len(text) == 7 or text[7].isspace()):
                system = text[len("/system"):].strip() or None
                history = []
                stdout.write(f"[system prompt {'set' if system else 'reset to the default'}; history cleared]\n")
                continue
            if text.startswith("/") and not text.startswith("//"):
                command = text.split()[0]
                print(f"telechat2 chat: error: unknown command {command}; commands: /reset, /system TEXT, /exit "
                      "(start a message with // to send a leading /)", file=sys.stderr)
                continue
            if text.startswith("//"):
                text = text[1:]
            history.append({"role": "user", "content": text})
            head = [{"role": "system", "content": system}] if system else []
            ids = tokenizer.apply_chat_template(head + history)
            while len(ids) > limit and len(history) > 1:        # drop the oldest exchange
                history = history[2:] if len(history) > 2 else history[1:]
                ids = tokenizer.apply_chat_template(head + history)
            ids = fit_prompt(ids, limit, "chat", refuse=False)
            stdout.write("bot> ")
            stdout.flush()
            new: list[int] = []
            shown = ""

            def stream(step, tokens):
                nonlocal shown
                tok = tokens[0]
                if tok in (gen.eos_token_id, *gen.stop_token_ids):
                    return
                new.append(tok)
                text_now = tokenizer.decode(new)
                if not text_now.endswith("\ufffd"):          # wait for the rest of a multi-byte character
                    stdout.write(text_now[len(shown):])
                    stdout.flush()
                    shown = text_now
            t = time.perf_counter()
            share_prompts(mesh, [ids])                      # the other ranks generate this turn too
            model.generate([ids], streamer=stream, **vars(gen))
            reply = tokenizer.decode(new)
            stdout.write(reply[len(shown):] + "\n")
            stdout.flush()
            history.append({"role": "assistant", "content": reply})
            if interactive:
                stdout.write(f"[{len(new)} tokens, {len(new) / (time.perf_counter() - t):.1f} tokens/s]\n")
    finally:
        share_prompts(mesh, END)        # at the end of stdin, /exit or an error: the other ranks stop too
