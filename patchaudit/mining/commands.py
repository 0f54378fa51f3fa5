"""The mining commands behind the CLI: parse nothing, validate everything, print one screen.

Each command checks its inputs (reports exist, the predicate is valid SQL, the cluster exists)
before it writes anything, so bad input ends with one clear line (MiningError, exit 2) and no
half-written output.
"""

from __future__ import annotations

import json
from typing import Any

from patchaudit.errors import MiningError, PatchauditError
from patchaudit.store.objects import open_store


def diff(old_uri: str, new_uri: str, out_uri: str | None = None, top: int = 10) -> dict[str, Any]:
    from patchaudit.mining.diff import DIFF_PREFIX, compute_diff, format_diff, write_diff
    from patchaudit.mining.reportio import open_report

    old = open_report(old_uri, "OLD report")
    new = open_report(new_uri, "NEW report")
    if old.store == new.store:
        raise MiningError(f"OLD and NEW are the same report ({old.uri}); pass two runs to compare")
    result = compute_diff(old, new)
    from patchaudit.mining.gallery import diff_page

    try:
        out = open_store(out_uri) if out_uri else new.store.child(DIFF_PREFIX.rstrip("/"))
        # links relative to the new report when the diff sits inside it (NEW/diff/diff.html)
        page = diff_page(result.summary, new.uri if not out_uri else "", DIFF_PREFIX)
        out.write_bytes("diff.html", page.encode())
        written = write_diff(out, result)
    except PatchauditError as exc:
        raise MiningError(f"cannot write the diff: {exc}") from None
    print(format_diff(result, top))
    print(f"\nwrote {written} (changes.parquet, folders.parquet, unmatched.parquet beside it)")
    if not out_uri:  # the diff belongs to the new run: a section of its review page
        from patchaudit.mining.gallery import diff_section

        _review_section(
            new.store, "diff", "Compared with an earlier run (patchaudit diff)", diff_section(result.summary, new.uri)
        )
    return result.summary


def _review_section(store: Any, name: str, title: str, html: str) -> None:
    """Add a section to the report's review page; the page is a view: failing to redraw it fails nothing."""
    from patchaudit.review.page import add_review_section

    try:
        uri = add_review_section(store, name, title, html)
        print(f"review page: {uri}")
    except PatchauditError as exc:
        print(f"review page not redrawn: {exc}")


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _image_uri(image: str) -> str:
    """A query given as a local path becomes the file:// URI reports use; URIs stay as they are."""
    from patchaudit.store.objects import resolve

    if "://" in image:
        return image
    try:
        store, key = resolve(image)
        return store.uri_for(key)
    except PatchauditError:
        return image


def similar(
    report_uris: list[str], image: str, k: int = 20, kind: str = "pooled", model_uri: str | None = None
) -> list[dict[str, Any]]:
    from patchaudit.mining import similar as sim
    from patchaudit.mining.reportio import open_report
    from patchaudit.store.objects import resolve

    if k < 1:
        raise MiningError(f"--k must be >= 1, got {k}")
    reps = [open_report(u) for u in report_uris]
    indexes = [sim.load_or_build(r, kind) for r in reps]
    space = sim.check_spaces(indexes)
    uri = _image_uri(image)
    vec = sim.find_vector(indexes, reps, uri, kind)
    source = "archived image"
    if vec is None:
        try:
            store, key = resolve(image)
            data = store.read_bytes(key)
        except PatchauditError as exc:
            raise MiningError(f"{image} is neither an image of the report(s) nor a readable file: {exc}") from None
        model_uri = model_uri or reps[0].model_uri()
        if not model_uri:
            raise MiningError(f"{reps[0].uri} does not record its model; pass --model to embed {image}")
        vec = sim.embed_file(model_uri, data, space, kind)
        source = f"new file, embedded with {model_uri}"
    hits = sim.search(indexes, vec, k, exclude_uri=uri)
    print(
        f"query {uri} ({source}); {kind} embedding, {sum(len(i) for i in indexes)} images in "
        f"{len(indexes)} report(s), {'exact' if all(i.exact for i in indexes) else 'IVF'} search"
    )
    print(f"{'rank':>4} {'sim':>6} {'score':>9} {'flag':>4}  image  [heatmap]")
    for h in hits:
        score = "error" if h["score"] is None else f"{h['score']:.4g}"
        flag = "" if h["is_anomalous"] is None else ("yes" if h["is_anomalous"] else "no")
        heat = f"  [{h['heatmap_uri']}]" if h["heatmap_uri"] else ""
        print(f"{h['rank']:>4} {h['similarity']:>6.3f} {score:>9} {flag:>4}  {h['image_uri']}{heat}")
    return hits


def cluster(report_uri: str, k: int, flagged_only: bool = True, kind: str = "peak") -> dict[str, Any]:
    from patchaudit.mining.cluster import CLUSTERS_HTML, compute_clusters, write_clusters
    from patchaudit.mining.reportio import open_report

    report = open_report(report_uri)
    result = compute_clusters(report, k, flagged_only, kind)
    try:
        uri = write_clusters(report, result)
    except PatchauditError as exc:
        raise MiningError(f"cannot write the clusters into {report.uri}: {exc}") from None
    s = result.summary
    print(f"{s['images']} {s['selection']} images of {report.uri} in {k} clusters by the {kind} feature")
    print(f"{'cluster':>7} {'images':>6} {'mean score':>10}  most central images")
    for g in s["groups"]:
        names = ", ".join(
            ex["image_uri"].rsplit("/", 2)[-2] + "/" + ex["image_uri"].rsplit("/", 1)[-1] for ex in g["examples"][:3]
        )
        mean = "n/a" if g["mean_score"] is None else f"{g['mean_score']:.4g}"
        print(f"{g['cluster']:>7} {g['size']:>6} {mean:>10}  {names}")
    print(f"\nwrote {uri} and {report.store.uri_for(CLUSTERS_HTML)} (a gallery per cluster)")
    from patchaudit.mining.gallery import cluster_gallery

    _review_section(
        report.store,
        "clusters",
        "Clusters of flagged images (patchaudit cluster)" if flagged_only else "Clusters (patchaudit cluster)",
        cluster_gallery(s, report.uri),
    )
    return s


def export(
    report_uri: str, where: str, to_uri: str, cluster: int | None = None, limit: int | None = None
) -> dict[str, Any]:
    from patchaudit.mining.export import run_export, select
    from patchaudit.mining.reportio import open_report

    report = open_report(report_uri)
    sel = select(report, where, cluster, limit)  # validates everything; nothing is written before
    res = run_export(sel, to_uri)
    print(
        f"selected {res['selected']} image(s); exported {res.get('exported', 0)} to {res['destination']} "
        f"({res.get('files_copied', 0)} file(s) copied now, the rest already there)"
    )
    for f in res["failed"][:10]:
        print(f"failed: {f}")
    if res["failed"]:
        raise MiningError(
            f"{len(res['failed'])} image(s) could not be copied (listed above and in export.json); "
            "rerun the same export to retry them"
        )
    return res
