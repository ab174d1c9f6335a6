"""The model card beside an export's weights (README.md, as the Hugging Face hub shows one): what the model is, the
data and the teacher it learned from, the distillation settings, its test figure with the interval, the decision
rule it ships with, how to load it, and what it is not for. Written from the export's own record (metrics.json:
a search's best/metrics.json, or `kdsearch distill`'s), so the card and the files never disagree."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from kd.config import Config


def model_card(cfg: Config, classes: list[str], threshold: float | None, metrics: dict[str, Any],
               params: int | None = None, started: dict[str, Any] | None = None) -> str:
    """`started`: the weights the teacher and the student started from (kd.export.started_from)."""
    test = metrics.get("test") or {}
    way = metrics.get("final") or "distill"
    members = metrics.get("members") or 0
    lines = ["---", "library_name: timm", "pipeline_tag: image-classification",
             "tags: [image-classification, timm, knowledge-distillation, kd-search]", "---", "",
             f"# {cfg.name}: `{cfg.student.name}` distilled from `{cfg.teacher.name}`", "",
             f"An image classifier for {len(classes)} classes ({', '.join(f'`{c}`' for c in classes)}) at "
             f"{cfg.data.image_size}x{cfg.data.image_size} px, trained with kd-search: {_how(way, members)}." +
             (f" {params / 1e6:.2f}M parameters." if params else ""), ""]
    lines += ["## Decision rule", "", _rule(classes, threshold, metrics), ""]
    lines += ["## Data", "", _data(cfg, test, metrics), ""]
    d, imb, t = cfg.distill, cfg.imbalance, cfg.train
    lines += ["## Distillation", "",
              f"- teacher: `{cfg.teacher.name}` ({'pretrained, ' if cfg.teacher.pretrained else ''}fine-tuned "
              f"{cfg.teacher.train.epochs} epochs on the same images)",
              f"- mode: {d.mode}" + (f", temperature {d.temperature:g}" if d.mode == "soft" else "") +
              f", alpha {d.alpha:g} (the distillation term's weight; 1 - alpha on the labels)",
              f"- class imbalance: {imb.method}",
              f"- {t.epochs} epochs, {t.optimizer}, peak learning rate {t.lr:g}, {t.schedule} schedule"
              + (f" restarted after epochs {', '.join(map(str, t.restarts))}" if t.restarts else "")
              + f", batch {t.batch_size}",
              *[f"- {role} weights at the start: {_weights(w)}" for role, w in (started or {}).items() if w], ""]
    lines += ["## Evaluation", "", *_evaluation(test, metrics), ""]
    lines += ["## Use", "", "```python", "import timm, torch", "",
              'model = timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True).eval()',
              "probs = model(images).softmax(-1)  # images: normalised as config.json says",
              f"pred = (probs[:, 1] >= {threshold:.4f}).long()  # the shipped rule, not argmax"
              if threshold is not None else "pred = probs.argmax(-1)", "```", "",
              "Or `kdsearch predict PATH/TO/THIS/FOLDER IMAGES...`, which applies the rule; `model.onnx` and "
              "`model.pt2` hold the same model with its preprocessing.", ""]
    lines += ["## Intended use and limits", "", _limits(cfg, test, metrics, threshold), ""]
    return "\n".join(lines)


def _weights(found: dict[str, Any]) -> str:
    """Where a model's starting weights came from (kd.hub.provenance), in a line."""
    if found.get("unknown"):
        return f"`{found['name']}`, not on the machine that exported this ({found['unknown']})"
    where = (f"`{found['repo']}` at revision `{found.get('revision', 'main')}`" +
             (f" (commit `{found['commit']}`)" if found.get("commit") else "") if found.get("repo") else
             f"`{found.get('path') or found.get('folder') or found['name']}`")
    return f"{where}, `{found['file']}` sha256 `{found['sha256']}`"


def _how(way: str, members: int) -> str:
    return {"refit": "the search's winning settings, refitted on all of train + validation",
            "ensemble": f"the search winner's {members} cross-validation students, averaged",
            "distilled": f"one student distilled from the search winner's {members} cross-validation students",
            "checkpoint": "the search's winning trial, as it was trained",
            }.get(way, "one distillation (`kdsearch distill`)")


def _rule(classes: list[str], threshold: float | None, metrics: dict[str, Any]) -> str:
    if threshold is None:
        return "argmax: the class with the highest probability."
    rule = metrics.get("rule") or {}
    why = (f" It shipped because it judged better than argmax on held-out predictions that did not tune it "
           f"(balanced accuracy {rule['cross_fitted']:.4f} against {rule['argmax']:.4f})."
           if rule.get("cross_fitted") is not None and rule.get("argmax") is not None else "")
    return (f"`{classes[1]}` when p(`{classes[1]}`) >= {threshold:.4f}, else `{classes[0]}`: a threshold tuned for "
            f"balanced accuracy on held-out predictions, not 0.5 or argmax.{why}")


def _data(cfg: Config, test: dict[str, Any], metrics: dict[str, Any]) -> str:
    source = {"digits": "scikit-learn's handwritten digits", "folder": "a folder of class folders",
              "csv": "a CSV of image files and labels"}[cfg.data.source]
    train = metrics.get("train_images")
    counts = [sum(row) for row in test.get("confusion_matrix", [])]
    out = f"Source: {source}" + (f" (`{Path(cfg.data.train.path).name}`)" if cfg.data.train else "") + "."
    if train:
        out += f" The model learned from {train} labelled images."
    if counts:
        out += f" Tested once on {sum(counts)} held-out images that no step of the training or selection saw (" + \
            ", ".join(f"{n} `{c}`" for c, n in zip(test.get("recall", {}), counts, strict=False)) + ")."
    if cfg.data.groups:
        out += f" Images are grouped by subject (`data.groups: {cfg.data.groups}`): a subject is in one split only."
    return out


def _evaluation(test: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
    if not test:
        return ["No test split was held out."]
    lo_hi = test.get("balanced_accuracy_interval")
    rows = ["| test | value |", "|---|---|",
            f"| balanced accuracy (as shipped) | {test['balanced_accuracy']:.4f}" +
            (f" (95% interval {lo_hi[0]:.3f}-{lo_hi[1]:.3f})" if lo_hi else "") + " |",
            f"| accuracy | {test['accuracy']:.4f} |"]
    rows += [f"| recall `{c}` | {r:.4f} |" for c, r in test.get("recall", {}).items()]
    if test.get("auc") is not None:
        rows.append(f"| AUC | {test['auc']:.4f} |")
    argmax, teacher = metrics.get("test_argmax") or {}, metrics.get("teacher_test") or {}
    if argmax:
        rows.append(f"| balanced accuracy at argmax | {argmax['balanced_accuracy']:.4f} |")
    if teacher:
        rows.append(f"| the teacher's balanced accuracy (argmax) | {teacher['balanced_accuracy']:.4f} |")
    twin = metrics.get("labels_only") or {}
    if twin.get("test_balanced_accuracy") is not None:
        rows.append(f"| the same settings without the teacher (alpha 0) | {twin['test_balanced_accuracy']:.4f} |")
    return rows


def _limits(cfg: Config, test: dict[str, Any], metrics: dict[str, Any], threshold: float | None) -> str:
    counts = [sum(row) for row in test.get("confusion_matrix", [])]
    out = (f"For images like those it learned from ({cfg.data.image_size} px, the same classes, the same kind of "
           "source); it has not been checked on any other distribution, and it says nothing about classes it "
           "never saw.")
    if counts:
        out += (f" Its test figure rests on {min(counts)} images of the rarest class: the interval above is how far "
                "that figure can be from the truth.")
    if threshold is not None:
        out += (" The threshold was tuned for balanced accuracy (each class's errors weighted alike); where one kind "
                "of error costs more, tune it for that cost.")
    warnings = metrics.get("warnings") or []
    if warnings:
        out += "\n\n" + "\n".join(f"- Warning: {w}" for w in warnings)
    return out
