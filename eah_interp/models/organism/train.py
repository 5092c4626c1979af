"""Train the organism's projector (and LoRA adapters on SmolLM2) on the synthetic scene world.

Seeded, CPU-only, about an hour on 2 cores. Writes ``eah_interp/data/organism.safetensors`` (the
weights ``load_organism`` ships with) and a loss log (CSV).

    python -m eah_interp.models.organism.train --steps 700 --batch-size 16

What is trained: the LLaVA projector (1280 → 576 → 576, GELU) and rank-8 LoRA factors on the q/k/v/o
projections of every SmolLM2 layer; the vision tower and the LM's own weights stay frozen. Data: a mix
of caption examples (``Describe the image.`` → ``A house, a tree and a star.``) and yes/no questions
(``Is there a star in the image? Answer yes or no.`` → ``Yes`` / ``No``, absent kinds drawn uniformly), from
training-split scenes (``eah_interp.scenes``, seeds below ``HELDOUT_SEED_OFFSET``) with strongly paired
kinds (``pair_strength``) so that the model learns the co-occurrence prior.
"""

from __future__ import annotations

import argparse
import csv
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from eah_interp.models.organism.loading import ORGANISM_WEIGHTS, assemble_organism
from eah_interp.models.organism.processor import caption_prompt, yes_no_prompt
from eah_interp.scenes import KINDS, make_scene, scene_seeds

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update ``scale * B @ A``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.A = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * F.linear(F.linear(x, self.A), self.B)


def add_lora(language_model: nn.Module, rank: int, alpha: float) -> dict[str, LoRALinear]:
    """Wrap the attention projections of every layer with LoRA; returns {module path: LoRALinear}."""
    wrapped = {}
    for name, module in list(language_model.named_modules()):
        for target in LORA_TARGETS:
            child = getattr(module, target, None)
            if isinstance(child, nn.Linear):
                lora = LoRALinear(child, rank, alpha)
                setattr(module, target, lora)
                wrapped[f"{name}.{target}" if name else target] = lora
    return wrapped


def build_examples(processor, scene, rng: random.Random, caption_fraction: float):
    """One training example (prompt ids, target ids) for a scene: a caption or a yes/no answer."""
    tok = processor.tokenizer
    if rng.random() < caption_fraction:
        prompt, answer = caption_prompt(), scene.caption()
    else:
        if rng.random() < 0.5:
            kind = rng.choice(sorted(scene.kinds))
        else:
            kind = rng.choice([k for k in KINDS if k not in scene.kinds])
        question, answer = scene.question(kind)
        prompt = yes_no_prompt(question)
    prompt_ids = processor.encode_text(prompt)
    target_ids = tok(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return prompt_ids, target_ids


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=700)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--n-scenes", type=int, default=8000)
    ap.add_argument("--pair-strength", type=float, default=0.9)
    ap.add_argument("--caption-fraction", type=float, default=0.6)
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lora-lr", type=float, default=4e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ORGANISM_WEIGHTS)
    ap.add_argument("--log", type=Path, default=Path("docs/organism_train_log.csv"))
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model, processor = assemble_organism()
    model.train(False)
    for p in model.parameters():
        p.requires_grad_(False)
    lm = model.model.language_model
    projector = model.model.multi_modal_projector
    for p in projector.parameters():
        p.requires_grad_(True)
    loras = add_lora(lm, args.lora_rank, 2.0 * args.lora_rank)

    # Frozen vision features, computed once: [n_scenes, 49, 1280] float16.
    scenes, feats = [], []
    seeds = list(scene_seeds("train", args.n_scenes))
    with torch.no_grad():
        for i in tqdm(range(0, len(seeds), 64), desc="vision features"):
            chunk = [make_scene(s, pair_strength=args.pair_strength) for s in seeds[i : i + 64]]
            pix = processor.image_processor([s.image for s in chunk])
            feats.append(model.model.vision_tower(pix).last_hidden_state.half())
            scenes.extend(chunk)
            for s in chunk:  # keep only the ground truth, not the pictures
                s.image = None
    features = torch.cat(feats)
    print(f"{len(scenes)} scenes, features {tuple(features.shape)} in {time.time() - t0:.0f}s", flush=True)

    params = [
        {"params": list(projector.parameters()), "lr": args.lr},
        {"params": [p for lo in loras.values() for p in (lo.A, lo.B)], "lr": args.lora_lr},
    ]
    opt = torch.optim.AdamW(params, weight_decay=0.0)
    base_lrs = [g["lr"] for g in opt.param_groups]
    warmup = max(1, args.steps // 20)
    embed = lm.get_input_embeddings()
    rng = random.Random(args.seed)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    log_f = args.log.open("w", newline="")
    log = csv.writer(log_f)
    log.writerow(["step", "loss", "seconds"])
    pad = processor.pad_token_id
    ema = None
    bar = tqdm(range(1, args.steps + 1), desc="train")
    for step in bar:
        frac = step / args.steps
        mult = step / warmup if step <= warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (args.steps - warmup)))
        for g, lr in zip(opt.param_groups, base_lrs, strict=True):
            g["lr"] = lr * mult
        idx = [rng.randrange(len(scenes)) for _ in range(args.batch_size)]
        examples = [build_examples(processor, scenes[i], rng, args.caption_fraction) for i in idx]
        width = max(len(p) + len(t) for p, t in examples)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        labels = torch.full((len(idx), width), -100, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, (p, t) in enumerate(examples):
            seq = p + t
            ids[r, : len(seq)] = torch.tensor(seq)
            labels[r, len(p) : len(seq)] = torch.tensor(t)
            mask[r, : len(seq)] = 1
        image_feats = projector(features[idx].float())  # [b, 49, 576]
        h = embed(ids)
        image_mask = ids == processor.image_token_id
        h = h.masked_scatter(image_mask.unsqueeze(-1), image_feats.to(h.dtype))
        hidden = lm(inputs_embeds=h, attention_mask=mask).last_hidden_state
        # predict token t+1 from position t; only the answer tokens count
        tgt = labels[:, 1:]
        sel = tgt != -100
        logits = model.lm_head(hidden[:, :-1][sel])
        loss = F.cross_entropy(logits, tgt[sel])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in params for p in g["params"]], 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}", frac=f"{frac:.2f}")
        log.writerow([step, f"{loss.item():.5f}", f"{time.time() - t0:.1f}"])
        if step % 10 == 0:
            log_f.flush()
        if step % 100 == 0 or step == args.steps:
            save_weights(args.out, projector, loras)
    log_f.close()
    print(f"done in {time.time() - t0:.0f}s; weights -> {args.out}", flush=True)


def save_weights(path: Path, projector: nn.Module, loras: dict[str, LoRALinear]) -> None:
    """Write projector + LoRA factors (B pre-multiplied by the LoRA scale) as float16 safetensors."""
    state = {f"multi_modal_projector.{k}": v.detach().half().contiguous() for k, v in projector.state_dict().items()}
    for name, lo in loras.items():
        state[f"lora.{name}.A"] = lo.A.detach().half().contiguous()
        state[f"lora.{name}.B"] = (lo.B.detach() * lo.scale).half().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"format": "eah-interp organism v1"})
    tmp.replace(path)


if __name__ == "__main__":
    main()
