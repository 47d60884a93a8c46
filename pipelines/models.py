"""The model registry from the command line: what is registered, what each version was trained on and scored with,
and the champion moved by hand or back.

    python pipelines/models.py list                                  # every model: versions, aliases, headline metric
    python pipelines/models.py versions maskflow-maskrcnn-penn-fudan # its versions with metrics, lineage, eval run
    python pipelines/models.py show maskflow-maskrcnn-penn-fudan@champion     # one version (or name/3): every tag
    python pipelines/models.py promote maskflow-maskrcnn-penn-fudan 3         # only if better (its evaluation metric)
    python pipelines/models.py promote maskflow-maskrcnn-penn-fudan 3 --force # by hand, whatever the metric says
    python pipelines/models.py rollback maskflow-maskrcnn-penn-fudan          # champion back to the one it replaced

The tracking server is ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else the local ``sqlite:///runs/mlflow.db``.
``--json`` prints machine-readable output. Jobs take the same names as ``model.uri``: ``models:/<name>@champion``
or ``models:/<name>/<version>``.
"""

import _bootstrap  # noqa: F401  (repository on sys.path)

import argparse
import json
import os
import sys

from maskflow import config, runtime, tracking

LINEAGE_TAGS = ("maskflow.data_digest", "maskflow.eval_data_digest", "maskflow.parent_version",
                "maskflow.previous_champion", "maskflow.code_version", "maskflow.retrain_run_id", "run_id",
                "eval.run_id", "maskflow.promoted_at", "maskflow.promoted_by", "maskflow.rolled_back")


def _parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    """``name``, ``name@alias``, ``name/3`` or ``models:/...`` -> (name, version, alias)."""
    ref = ref.removeprefix("models:/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return name, None, alias
    if "/" in ref:
        name, version = ref.rsplit("/", 1)
        return name, version, None
    return ref, None, None


def _require_model(name: str) -> None:
    if tracking.latest_version(name) is None:
        raise config.ConfigError(f"model: no registered model {name!r} (see: python pipelines/models.py list)")


def _version(name: str, version: str | None, alias: str | None):
    c = tracking.client()
    _require_model(name)
    if alias:
        v = tracking.model_version_for_alias(name, alias)
        if v is None:
            raise config.ConfigError(f"model: {name!r} has no alias {alias!r} (see: python pipelines/models.py "
                                     f"versions {name})")
        return v
    if version is None:
        raise config.ConfigError(f"model: name a version ({name}/N) or an alias ({name}@champion)")
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version(name, version)
    except MlflowException:
        raise config.ConfigError(f"model: {name!r} has no version {version} (latest: "
                                 f"{tracking.latest_version(name)})") from None


def _aliases(name: str) -> dict[str, list[str]]:
    by_version: dict[str, list[str]] = {}
    for alias, version in tracking.client().get_registered_model(name).aliases.items():
        by_version.setdefault(str(version), []).append(alias)
    return by_version


def _row(v, aliases: dict[str, list[str]]) -> dict:
    tags = dict(v.tags)
    metric = tags.get(tracking.METRIC_TAG)
    value = tags.get(f"{tracking.EVAL_TAG_PREFIX}{metric}") if metric else None
    return {"name": v.name, "version": str(v.version), "aliases": sorted(aliases.get(str(v.version), [])),
            "kind": tags.get(tracking.KIND_TAG), "metric": metric, "value": None if value is None else float(value),
            "higher_is_better": tags.get(tracking.HIGHER_IS_BETTER_TAG),
            "created": v.creation_timestamp, "run_id": v.run_id,
            "lineage": {k: tags[k] for k in LINEAGE_TAGS if k in tags},
            "metrics": {k[len(tracking.EVAL_TAG_PREFIX):]: float(val) for k, val in tags.items()
                        if k.startswith(tracking.EVAL_TAG_PREFIX) and k != "eval.run_id"}}


def _versions(name: str) -> list[dict]:
    aliases = _aliases(name)
    versions = tracking.client().search_model_versions(f"name = '{name}'")
    return [_row(v, aliases) for v in sorted(versions, key=lambda v: int(v.version))]


def _fmt_value(row: dict) -> str:
    if row["metric"] is None or row["value"] is None:
        return "not evaluated"
    arrow = "" if row["higher_is_better"] is None else (" (higher better)" if row["higher_is_better"] == "true"
                                                         else " (lower better)")
    return f"{row['metric']} {row['value']:.4g}{arrow}"


def cmd_list(args) -> object:
    out = []
    for m in sorted(tracking.client().search_registered_models(), key=lambda m: m.name):
        rows = _versions(m.name)
        champion = next((r for r in rows if "champion" in r["aliases"]), None)
        out.append({"name": m.name, "versions": len(rows), "kind": rows[-1]["kind"] if rows else None,
                    "aliases": {a: v for v, al in _aliases(m.name).items() for a in al},
                    "champion": None if champion is None else {"version": champion["version"],
                                                               "metric": champion["metric"],
                                                               "value": champion["value"]}})
    if not args.json:
        if not out:
            print("no registered models (train one: python trainers/<model>.py ... registry.model_name=<name>)")
        for m in out:
            champ = m["champion"]
            aliases = ", ".join(f"{a}=v{v}" for a, v in sorted(m["aliases"].items())) or "no aliases"
            value = "" if champ is None or champ["value"] is None else f", champion {champ['metric']} {champ['value']:.4g}"
            print(f"{m['name']}  [{m['kind'] or '?'}]  {m['versions']} version(s)  {aliases}{value}")
    return out


def cmd_versions(args) -> object:
    name = _parse_ref(args.model)[0]
    _require_model(name)
    rows = _versions(name)
    if not args.json:
        for r in rows:
            lineage = r["lineage"]
            parent = f", parent v{lineage['maskflow.parent_version']}" if lineage.get("maskflow.parent_version") else ""
            data = f", data {lineage['maskflow.data_digest'][:12]}" if "maskflow.data_digest" in lineage else ""
            eval_run = f", eval run {lineage['eval.run_id']}" if "eval.run_id" in lineage else ""
            aliases = f" @{',@'.join(r['aliases'])}" if r["aliases"] else ""
            print(f"v{r['version']}{aliases}: {_fmt_value(r)}{parent}{data}{eval_run}, training run {r['run_id']}")
    return rows


def cmd_show(args) -> object:
    v = _version(*_parse_ref(args.model))
    row = _row(v, _aliases(v.name))
    row["tags"] = dict(v.tags)
    row["source"] = v.source
    if not args.json:
        print(f"{v.name} v{v.version}" + (f" @{',@'.join(row['aliases'])}" if row["aliases"] else "")
              + f"  [{row['kind'] or '?'}]  {_fmt_value(row)}")
        print(f"  load with: models:/{v.name}/{v.version}")
        for k in sorted(row["tags"]):
            print(f"  {k}: {row['tags'][k]}")
    return row


def cmd_promote(args) -> object:
    name, version, alias = _parse_ref(args.model)
    version = args.version or version
    if alias:
        version = str(_version(name, None, alias).version)
    if args.force:
        if version is None:
            raise config.ConfigError("version: required with --force (the version to make champion)")
        _version(name, version, None)
        previous = tracking.set_champion(name, version, by="hand (pipelines/models.py promote --force)")
        decision = {"model": name, "champion_version": version, "previous_champion": previous, "promoted": True,
                    "forced": True}
    else:
        try:
            decision = tracking.promote(name, args.metric, version, margin=args.margin,
                                        by="hand (pipelines/models.py promote)")
        except ValueError as e:
            raise config.ConfigError(f"model: {e}") from None
    if not args.json:
        if decision.get("forced"):
            print(f"{name}: champion is now v{version} (was v{decision['previous_champion']}; by hand)")
        else:
            verdict = "promoted" if decision["promoted"] else "not promoted"
            print(f"{name} v{decision['candidate_version']}: {verdict} — {decision['metric']} "
                  f"{decision['candidate_value']:.4g} vs champion "
                  + ("none" if decision["champion_version"] is None else
                     f"v{decision['champion_version']} {decision['champion_value']:.4g}"))
    return decision


def cmd_rollback(args) -> object:
    name = _parse_ref(args.model)[0]
    _require_model(name)
    try:
        decision = tracking.rollback(name)
    except ValueError as e:
        raise config.ConfigError(f"model: {e}") from None
    if not args.json:
        print(f"{name}: champion back to v{decision['champion_version']} (v{decision['rolled_back_version']} "
              "rolled back)")
    return decision


def main(argv=None) -> object:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///runs/mlflow.db"))
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every registered model")
    p = sub.add_parser("versions", help="a model's versions")
    p.add_argument("model")
    p = sub.add_parser("show", help="one version: name/N or name@alias")
    p.add_argument("model")
    p = sub.add_parser("promote", help="make a version champion: only if better, or --force")
    p.add_argument("model", help="name, name/N or name@alias")
    p.add_argument("version", nargs="?", help="the version (default: the one named, else the candidate)")
    p.add_argument("--force", action="store_true", help="whatever the metric says (recorded as by hand)")
    p.add_argument("--metric", default=None, help="default: the version's recorded headline metric")
    p.add_argument("--margin", type=float, default=0.0, help="must beat the champion by more than this")
    p = sub.add_parser("rollback", help="champion back to the version it replaced")
    p.add_argument("model")
    args = parser.parse_args(argv)
    runtime.setup_logging()
    tracking.setup(tracking.TrackingConfig(tracking_uri=args.tracking_uri))
    result = {"list": cmd_list, "versions": cmd_versions, "show": cmd_show, "promote": cmd_promote,
              "rollback": cmd_rollback}[args.command](args)
    if args.json:
        json.dump(result, sys.stdout, indent=1, default=str)
        print()
    return result


if __name__ == "__main__":
    config.main_guard(main)
