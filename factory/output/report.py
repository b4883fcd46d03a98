"""Human-facing outputs of a build: progress lines, the final summary, the dataset card and the
contact sheet (source sequence | reference set | kept | rejected, with scores)."""

from __future__ import annotations

import io
import itertools
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from PIL import Image, ImageDraw

from core.config import config_to_yaml
from core.shards import encode_image
from core.storage import Location
from core.settings.run import RunConfig


@dataclass
class BuildSummary:
    """What a build did. `generated`/`kept` count this run; `total_*` the whole dataset (every
    identity done so far, this run and earlier ones), so a rerun with nothing left to do still
    reports what the output holds."""

    out_dir: str
    identities_planned: int = 0
    identities_skipped_done: int = 0
    identities_processed: int = 0
    identities_failed: int = 0
    identities_skipped_input: int = 0
    images_quarantined: int = 0
    generated: int = 0
    kept: int = 0
    total_identities_done: int = 0
    total_generated: int = 0
    total_kept: int = 0
    output_identities: int = 0
    output_images: int = 0
    failures: dict[str, str] = field(default_factory=dict)  # identity -> "ErrorClass: message"
    aborted: str | None = None  # why the build stopped early (the circuit breaker), else None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    wall_seconds: float = 0.0
    gpus: bool = False  # whether the stages ran on GPUs (else costs are CPU actor-seconds)
    references_reused: int = 0  # identities whose Attribute Reference Set was shared, this run
    identity_seconds: float = 0.0  # summed over the identities generated this run (all phases)
    gpu_seconds: float = 0.0
    # Identities generated this run of which the filter kept no image: in the manifest (done),
    # not in the shards. Named, so a shrinking dataset is never silent.
    identities_without_kept: list[str] = field(default_factory=list)
    source_images: int = 0  # training images in the sources of the identities in the shards (all runs)

    @property
    def acceptance_rate(self) -> float:
        """Kept / generated over the whole dataset."""
        return self.total_kept / self.total_generated if self.total_generated else 0.0

    def add_seconds(self, stage: str, seconds: float) -> None:
        self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds

    def add_identity_cost(self, seconds: float, gpu_seconds: float) -> None:
        self.identity_seconds += seconds
        self.gpu_seconds += gpu_seconds

    def plan_projection(self) -> str | None:
        """The whole plan's cost at this run's measured rate, e.g. '5183 identities ~ 576.0
        GPU-hours at 400 GPU-s per identity'."""
        done = self.identities_processed - self.identities_failed
        if done <= 0:
            return None
        per_identity, unit = ((self.gpu_seconds / done, "GPU") if self.gpus else (self.identity_seconds / done, "actor"))
        hours = per_identity * self.identities_planned / 3600
        return (f"{self.identities_planned} planned identities ~ {hours:.2f} {unit}-hours at the measured "
                f"{per_identity:.1f} {unit}-s per identity")

    def record_failure(self, identity: str, error: str) -> None:
        self.identities_failed += 1
        self.failures[identity] = error

    def add_dataset_totals(self, manifest: dict) -> None:
        done = manifest.get("identities", {}).values()
        self.total_identities_done = len(done)
        self.total_generated = sum(entry.get("generated", 0) for entry in done)
        self.total_kept = sum(entry.get("kept", 0) for entry in done)
        self.source_images = sum(entry.get("source_images", 0) for entry in done if entry.get("kept", 0))

    def failures_by_error(self) -> dict[str, dict]:
        """Failed identities grouped by error class: count, one example message, the identities."""
        groups: dict[str, dict] = {}
        for identity, error in sorted(self.failures.items()):
            group = groups.setdefault(error_class(error), {"count": 0, "example": error, "identities": []})
            group["count"] += 1
            group["identities"].append(identity)
        return groups

    def as_dict(self) -> dict:
        return {**asdict(self), "acceptance_rate": self.acceptance_rate, "failures_by_error": self.failures_by_error(),
                "plan_projection": self.plan_projection()}

    def render(self) -> str:
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in sorted(self.stage_seconds.items()))
        if self.identities_processed:
            this_run = (f"{self.generated} generated, {self.kept} kept "
                        f"({100 * self.kept / self.generated if self.generated else 0:.1f}%) this run")
        else:
            this_run = (f"nothing generated this run ({self.identities_skipped_done} of "
                        f"{self.identities_planned} planned identities were already done)")
        lines = [
            "== factory.build summary ==",
            f"output:          {self.out_dir}",
            f"identities:      {self.identities_processed} processed this run, "
            f"{self.identities_skipped_done} already done, {self.identities_failed} failed, "
            f"{self.identities_skipped_input} skipped (too few readable images)",
            f"images:          {this_run}; {self.images_quarantined} source images quarantined",
            f"reference sets:  {self.references_reused} of {self.identities_processed - self.identities_failed} "
            "shared with an identity of the same reference prompt (this run)",
            f"dataset:         {self.output_images} images of {self.output_identities} identities in shards/ "
            f"(all runs: {self.total_identities_done} identities done, {self.total_generated} generated, "
            f"{self.total_kept} kept, acceptance {100 * self.acceptance_rate:.1f}%)",
        ]
        if self.identities_without_kept:
            empty = self.identities_without_kept
            shown = ", ".join(empty[:8]) + (" ..." if len(empty) > 8 else "")
            lines.append(f"no image kept:   {len(empty)} of {self.identities_processed - self.identities_failed} "
                         f"identities this run (done, but not in the shards; summary.json lists them): {shown}")
        if self.source_images:
            lines.append(f"vs the source:   {self.output_images} images in the shards from {self.source_images} source "
                         f"training images of the same identities ({self.output_images / self.source_images:.2f}x)")
        for name, group in self.failures_by_error().items():
            shown = ", ".join(group["identities"][:8]) + (" ..." if group["count"] > 8 else "")
            lines.append(f"failed:          {group['count']} x {name}, e.g. {group['example'][:200]!r}: {shown}")
        if self.aborted:
            lines.append(f"stopped early:   {self.aborted}")
        if self.plan_projection():
            lines.append(f"cost:            {self.plan_projection()}")
        lines += [f"stage seconds:   {stages or '-'} (summed over actors)",
                  f"wall time:       {self.wall_seconds:.1f}s"]
        return "\n".join(lines)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


@dataclass
class PlanClock:
    """Progress of this run's planned identities: elapsed time, throughput and an ETA, for the
    per-identity log line (Ray Data's bars show no ETA for batches that take minutes)."""

    total: int
    started: float = field(default_factory=time.perf_counter)
    done: int = 0

    def tick(self, now: float | None = None) -> str:
        """Count one finished identity; `now` (default: the clock) for tests and replays."""
        self.done += 1
        elapsed = max((time.perf_counter() if now is None else now) - self.started, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate
        return f"{_clock(elapsed)} elapsed, {rate * 3600:.0f} identities/h, ETA {_clock(eta)}"


def error_class(error: str) -> str:
    """`RuntimeError` of `"RuntimeError: boom"` (the stages record errors as `Class: message`)."""
    name, sep, _ = error.partition(":")
    return name.strip() if sep and name.strip().isidentifier() else "Error"


def write_dataset_card(location: Location, config: RunConfig, summary: BuildSummary, manifest: dict) -> None:
    sources = ", ".join(f"{s.source_name} ({s.kind}: {s.root})" for s in config.sources)
    g, f = config.generation, config.filter
    text = f"""# Diffusion-ReID synthetic dataset

Generated by `python -m factory.build` (Diffusion-ReID: LPE captioning, per-identity
fine-tuning with the Fine-Grain-Specific Prior Preservation Loss, {f.kind} filter).

| | |
|---|---|
| identities in shards | {summary.output_identities} |
| images in shards | {summary.output_images} |
| generated (all identities done) | {summary.total_generated} |
| kept | {summary.total_kept} (acceptance rate {100 * summary.acceptance_rate:.1f}%) |
| source training images of these identities | {summary.source_images} |
| generated images per source image | {f"{summary.output_images / summary.source_images:.2f}" if summary.source_images else "-"} |
| identities done with no image kept | {sum(1 for e in manifest.get("identities", {}).values() if not e.get("kept", 0))} (not in the shards) |
| failed identities | {len(manifest.get("failed", {}))} |
| sources | {sources} |
| text-to-image base | `{g.base_model}` at {g.resolution[0]}x{g.resolution[1]} |
| captioner | {f"`{config.caption.model}`" if config.caption.captions == "lpe" else "none (category prompt)"}, IIR token {f"`{config.caption.iir_token}`" if config.caption.use_iir else "none"} |
| fine-tune | {g.train_steps} steps, lr {g.learning_rate}, lambda {g.prior_loss_weight}, {g.reference_images} reference images |
| samples per identity | {g.samples_per_identity}, {g.num_inference_steps} steps, guidance {g.guidance_scale}{f"; replayed from `{g.replay_from}` (filtered again, not generated)" if g.replay_from else ""} |
| filter | {f.kind}, threshold {f.threshold} |
| measured cost | {summary.plan_projection() or "nothing generated this run"} |
| reference sets reused | {sum(bool(e.get("reference_reused")) for e in manifest.get("identities", {}).values())} of {summary.total_identities_done} identities |
| stored size | {config.output.image_size[0]}x{config.output.image_size[1]} {config.output.image_format} |

Read it with `ray.data.read_parquet("shards")`, `pandas.read_parquet("shards")` or
`datasets.load_dataset("parquet", data_files="shards/*.parquet")` (which yields `image` as a PIL
image and `pid` as a class label named by identity). Columns: `image` (struct bytes/path), `pid`
(dense), `source`, `source_pid`, `identity`, `prompt`, `seed`, `score`, `index`. Identities are
mixed across shards; `shards/_shards.json` lists the files. Every image is reproducible from
`config.yaml`, its identity and its seed.

## Resolved config

```yaml
{config_to_yaml(config)}```
"""
    location.write_text(text)


def _thumb(data: bytes, height: int) -> Image.Image:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    width = max(1, round(image.width * height / image.height))
    return image.resize((width, height))


def identity_strip(row: dict, height: int = 96, per_group: int = 6) -> Image.Image:
    """One contact-sheet row: source | reference | kept | rejected, scores under generated ones."""
    generated = list(zip(row["generated"], row["scores"], row["kept"]))
    groups: list[tuple[str, list[tuple[bytes, str]]]] = [
        ("source", [(b, "") for b in row["image_bytes"][:per_group]]),
        ("reference", [(b, "") for b in row["reference_preview"][:per_group]]),
        ("kept", [(b, f"{s:.2f}") for b, s, k in generated if k][:per_group]),
        ("rejected", [(b, f"{s:.2f}") for b, s, k in generated if not k][:per_group]),
    ]
    label_h, gap, min_group = 14, 12, 70
    thumbs = [[(_thumb(b, height), caption) for b, caption in items] for _, items in groups]
    widths = [max(min_group, sum(t.width + 2 for t, _ in items)) for items in thumbs]
    width = sum(w + gap for w in widths) + 150
    strip = Image.new("RGB", (width, height + 2 * label_h), "white")
    draw = ImageDraw.Draw(strip)
    draw.text((4, height // 2), row["identity"], fill="black")
    x = 150
    for (title, _), items, group_width in zip(groups, thumbs, widths):
        draw.text((x, 0), title if items else f"{title}: none", fill="black")
        left = x
        for thumb, caption in items:
            strip.paste(thumb, (left, label_h))
            draw.text((left, label_h + height), caption, fill="black")
            left += thumb.width + 2
        x += group_width + gap
    return strip


def write_contact_sheet(location: Location, strips: Sequence[Location]) -> Location | None:
    images = []
    for strip in strips:
        try:
            images.append(Image.open(io.BytesIO(strip.read_bytes())).convert("RGB"))
        except OSError:  # a damaged preview: skip it, it is cosmetic
            continue
    if not images:
        return None
    sheet = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images)), "white")
    for image, y in zip(images, itertools.accumulate((i.height for i in images), initial=0)):
        sheet.paste(image, (0, y))
    location.write_bytes(encode_image(sheet, fmt="png"))
    return location
