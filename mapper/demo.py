"""``mapper demo`` (``make demo``): the whole job on a tiny model, start to finish, offline.

1. synthesise a tiny GPT-NeoX checkpoint trained "with Transformer Engine" (te_mha +
   te_layernorm_mlp, TP=2, pipeline files, FP8 metadata, and the stale post_attention_layernorm
   of pre-fix checkpoints -- the setup of GPT-NeoX issue #1353);
2. convert it to a HuggingFace folder, detecting the rule set;
3. verify the HF model (transformers) against NeoX's own forward pass, layer by layer;
4. convert it back and check every tensor returns bit for bit.
Everything is seeded: the demo prints the same numbers on every machine.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from mapper.checkpoints import convert_checkpoint
from mapper.errors import VerificationFailed
from mapper.testing import synthesize_variant, write_neox_checkpoint
from mapper.verify.checkpoints import verify_checkpoints
from mapper.verify.roundtrip import roundtrip


def run_demo(out_dir: Path, console: Console) -> None:
    if out_dir.exists():
        if not (out_dir / ".mapper-demo").is_file():
            from mapper.errors import MapperError

            raise MapperError(f"{out_dir} exists and was not made by the demo", hint="pass --out to another folder")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    (out_dir / ".mapper-demo").write_text("made by `mapper demo`; safe to delete\n")

    console.rule("1. a tiny Transformer Engine checkpoint (TP=2)")
    config, tensors = synthesize_variant("te-full-fp8", tp=2, seed=0)
    neox = write_neox_checkpoint(tensors, config, out_dir / "neox-te", tokenizer=True)
    console.print(f"{neox}: {len(tensors)} tensors in pipeline files, {config.num_layers} layers, hidden "
                  f"{config.hidden_size}, te_mha + te_layernorm_mlp, FP8 _extra_state, stale post_attention_layernorm")

    console.rule("2. convert to HuggingFace")
    result = convert_checkpoint(neox, out_dir / "hf")
    console.print(f"rule set [bold]{result.prepared.forward_rules.name}[/bold] {result.prepared.forward_rules.version} "
                  "(detected from the keys and the config)")
    for note in result.prepared.notes:
        console.print(f"  {escape(note)}")
    console.print(f"wrote {result.output}: {result.report.tensors} tensors, sidecar with "
                  f"{len(result.report.sidecar)} entries")

    console.rule("3. verify against NeoX's own forward pass")
    report = verify_checkpoints(neox, result.output)
    console.print(escape(report.render()))

    console.rule("4. round trip HF -> NeoX")
    trip = roundtrip(neox)
    counts = ", ".join(f"{v} {k}" for k, v in trip.diff.counts().items())
    console.print(("[green]bit-exact[/green]: " if trip.ok else "[red]NOT exact[/red]: ") + counts)
    for lossy in trip.lossy:
        console.print(f"  {lossy['rule']} {escape(lossy['op'])}: {lossy['tensors']} lossy step(s), "
                      f"{lossy['from_sidecar']} restored from the sidecar, {lossy['from_default']} exact without it")

    if not report.ok or not trip.ok:
        raise VerificationFailed("the demo conversion did not verify", hint="please report this with the output above")
    console.rule("next")
    console.print(
        "Convert your own checkpoint:\n"
        f"  mapper plan    /path/to/checkpoints            # dry run: rule set, every tensor, peak memory\n"
        f"  mapper convert /path/to/checkpoints hf-out     # NeoX -> HF (config from configs/ or --config)\n"
        f"  mapper verify  /path/to/checkpoints hf-out     # layer-by-layer proof, exit 1 if it differs\n"
        f"  mapper convert hf-out neox-again --tp 2        # and back\n"
        "A layout no shipped rule set knows? mapper rules new my-rules --from neox-to-hf-gpt-neox"
    )
