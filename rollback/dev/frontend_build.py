"""The demo frontend's build: what a pipeline would leave for `DirectoryStore.publish`, one release per call.

`build_release(out_root, "v2", created=...)` writes `out_root/v2/`:

    index.html               the page: `#version`, `#items`, `#error`, `#banner`, `<meta name="version-check-ms">`
    version.json             {"version": "v2", "build": "v2-<8 hex>"}
    assets/app.<hash>.js     the bootstrap (an ES module): pins the tab, loads the chunk, watches /version.json
    assets/items.<hash>.js   the lazily imported chunk: fetches /api/items and renders them
    release.json             every file's sha256 and the backend operations the chunk calls

What the page does is the skew protection the origin (rollback/targets/frontend/origin.py) is built for:

- It sets the cookie `__dpl=<its version>` (path `/assets/`), so its later chunk requests are answered
  from its own release while that is retained, whatever is live; another tab's chunks the pinned
  release lacks come from the origin's pool.
- It polls `/version.json` (always the live release) every `version-check-ms` and after a failed chunk
  load; when another version is live it clears its pin (the reloaded page must not ask for this release,
  and a `path=/` pin an older build set would even answer the reload from it) and reloads once. A guard
  in sessionStorage (`reloadedFor`) makes that once per live version: when a reload lands on another
  version again (a pinning header, a stale cache), it shows `#banner` instead of looping.

Hooks for the browser tests, on `window`: `loadItems(chunkUrl?)` imports the chunk afresh (a new query
each time: a second `import()` of one URL is answered from the module map, never the network) and
resolves to the record it appends to `chunkLoads` ({ok, status, version | error}); `checkVersion()`;
`versionChecks` (each check's reason and the live version); sessionStorage `reloads` counts reloads.

Faults: `broken-js` throws while the chunk evaluates (the page shows `#error`); `missing-api` makes
the chunk also call `GET /api/orders`, which the demo backend lacks, and declares it in release.json,
so the orchestrator's compatibility check can refuse the release before any browser sees it.

Deterministic: the same inputs give byte-identical files, and mtimes set to `created` (a reproducible
build's convention), so publishing a release twice is a no-op. Nothing in the product imports this.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import shutil
from datetime import datetime
from pathlib import Path
from typing import Literal

from rollback.targets.frontend.release import ENTRY_POINT, write_manifest
from rollback.targets.frontend.store import ASSETS
from rollback.versions import version_problem

Fault = Literal["none", "broken-js", "missing-api"]
FAULTS: tuple[Fault, ...] = ("none", "broken-js", "missing-api")
DEFAULT_CHECK_INTERVAL_MS = 5000
VERSION_FILE = "version.json"
ITEMS_OPERATION = "GET /api/items"
MISSING_OPERATION = "GET /api/orders"  # the demo backend (rollback/demo_app.py) answers it 404
# The cookie the origin pins by (origin.pinning_maps reads `$cookie___dpl`). Its path is the assets'
# only: the cookie is one per browser, not per tab, and the origin pins `/` by it too, so with `path=/`
# every new tab (and every reload) would open on whatever release the last tab pinned: after a
# rollback, the release just rolled back. Asset requests carry it; navigations open on the live one.
PIN_COOKIE = "__dpl"
PIN_COOKIE_PATH = f"/{ASSETS}/"
# sessionStorage keys the page keeps across its own reloads (tests read them too).
GUARD_KEY = "reloadedFor"
RELOADS_KEY = "reloads"


def content_name(stem: str, content: bytes, suffix: str) -> str:
    """`<stem>.<first 10 hex of sha256>.<suffix>`: a content-addressed name, immutable once served."""
    return f"{stem}.{hashlib.sha256(content).hexdigest()[:10]}.{suffix}"


def build_release(out_root: Path, version: str, *, fault: Fault = "none", created: datetime,
                  check_interval_ms: int = DEFAULT_CHECK_INTERVAL_MS) -> Path:
    """Write the release `version` to `out_root/<version>/` (replacing a previous build there) and return that
    directory, ready for `DirectoryStore.publish`. ValueError for a bad version, fault or interval."""
    problem = version_problem(version)
    if problem is not None:
        raise ValueError(f"version: {problem}")
    if fault not in FAULTS:
        raise ValueError(f"fault: {fault!r} is not one of {', '.join(FAULTS)}")
    if isinstance(check_interval_ms, bool) or not isinstance(check_interval_ms, int) or check_interval_ms < 50:
        raise ValueError(f"check_interval_ms: {check_interval_ms!r} is not a whole number of milliseconds >= 50")

    # The chunk first: the bootstrap names it, and the page names the bootstrap, so each name is the
    # hash of content that already holds the names below it.
    items = _items_chunk(version, fault).encode()
    items_name = content_name("items", items, "js")
    app = _bootstrap(version, f"/{ASSETS}/{items_name}").encode()
    app_name = content_name("app", app, "js")
    assets = {items_name: items, app_name: app}
    digest = hashlib.sha256()
    for name, content in sorted(assets.items()):
        digest.update(name.encode() + b"\0" + hashlib.sha256(content).digest())
    build = f"{version}-{digest.hexdigest()[:8]}"
    files = {f"{ASSETS}/{name}": content for name, content in assets.items()}
    files[ENTRY_POINT] = _index_html(version, f"/{ASSETS}/{app_name}", check_interval_ms).encode()
    files[VERSION_FILE] = (json.dumps({"version": version, "build": build}) + "\n").encode()

    # Written under a staging directory and renamed into place, release.json last: a build that dies
    # half-way never looks like a release. (write_manifest takes the version from the directory's name.)
    target = out_root / version
    staging_root = out_root / f".building.{version}.{os.getpid()}"
    staging = staging_root / version
    shutil.rmtree(staging_root, ignore_errors=True)
    for relative, content in files.items():
        path = staging / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    api = [ITEMS_OPERATION] + ([MISSING_OPERATION] if fault == "missing-api" else [])
    write_manifest(staging, build=build, created=created, api=api)
    # nginx's ETag is mtime + size: releases built in the same second with same-sized pages would share
    # ETags, and a browser revalidating index.html after a switch would get 304 for the old page. The
    # build time is the reproducible mtime (distinct releases are built at distinct times).
    stamp = created.timestamp()
    for path in [*staging.rglob("*"), staging]:
        os.utime(path, (stamp, stamp), follow_symlinks=False)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    staging_root.rmdir()
    return target


def _js(value: object) -> str:
    """A JavaScript literal (JSON is one), safe inside a module: no `</script>` can close anything."""
    return json.dumps(value).replace("<", "\\u003c")


def _index_html(version: str, app_url: str, check_interval_ms: int) -> str:
    v = html.escape(version)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="release-version" content="{v}">
<meta name="version-check-ms" content="{check_interval_ms}">
<title>Demo shop {v}</title>
<script type="module" src="{html.escape(app_url)}"></script>
</head>
<body>
<h1>Demo shop <span id="version">{v}</span></h1>
<p id="banner" role="status" hidden></p>
<p id="error" role="alert" hidden></p>
<ul id="items"></ul>
</body>
</html>
"""


def _items_chunk(version: str, fault: Fault) -> str:
    """The lazily loaded chunk: exports its version and `render(list)`."""
    broken = f"throw new Error({_js(f'broken release {version}')});\n" if fault == "broken-js" else ""
    # A build that calls an operation the backend lacks: render fails with the operation's status.
    orders = ('  const orders = await fetch("/api/orders", {headers: {accept: "application/json"}});\n'
              '  if (!orders.ok) throw new Error(`GET /api/orders answered ${orders.status}`);\n') if fault == "missing-api" else ""
    return f"""// Demo shop {version}: the items chunk, loaded with import() by the bootstrap.
{broken}export const VERSION = {_js(version)};

export async function render(list) {{
  const response = await fetch("/api/items", {{headers: {{accept: "application/json"}}}});
  if (!response.ok) throw new Error(`GET /api/items answered ${{response.status}}`);
  const items = await response.json();
{orders}  list.replaceChildren(...items.map((item) => {{
    const entry = document.createElement("li");
    entry.textContent = `${{item.name}} ${{item.price}}`;
    return entry;
  }}));
  return items.length;
}}
"""


def _bootstrap(version: str, chunk_url: str) -> str:
    """The page's module: pinning, the chunk loader, the version watch."""
    return f"""// Demo shop {version}: the bootstrap. Pins this tab to its release, loads the items chunk, and moves
// to the live release once when another one goes live.
const VERSION = {_js(version)};
const CHUNK = {_js(chunk_url)};
const PIN_COOKIE = {_js(PIN_COOKIE)};
const PIN_PATH = {_js(PIN_COOKIE_PATH)};
const GUARD = {_js(GUARD_KEY)};
const RELOADS = {_js(RELOADS_KEY)};
const meta = document.querySelector('meta[name="version-check-ms"]');
const CHECK_MS = Math.max(50, Number(meta && meta.content) || {DEFAULT_CHECK_INTERVAL_MS});

// Skew protection: the origin answers this tab's later asset requests from its own release.
document.cookie = `${{PIN_COOKIE}}=${{VERSION}}; path=${{PIN_PATH}}; SameSite=Lax`;

window.chunkLoads = [];
window.versionChecks = [];
// Each fresh import() gets a query no earlier one had, in this document or a previous one (an
// immutable asset stays in the HTTP cache across reloads, and is shared by tabs). Not `dpl`: that
// query pins the request.
const loadPrefix = `${{Math.round(performance.timeOrigin)}}-${{Math.random().toString(36).slice(2, 8)}}`;
let loads = 0;
let reloading = false;
performance.setResourceTimingBufferSize(100000);

function show(id, text) {{
  const element = document.getElementById(id);
  element.textContent = text;
  element.hidden = text === "";
}}

// The HTTP status the import's request got (resource timing: no second request to learn it).
function statusOf(url) {{
  const entries = performance.getEntriesByName(new URL(url, location.href).href);
  const last = entries[entries.length - 1];
  return last && typeof last.responseStatus === "number" ? last.responseStatus : null;
}}

async function loadItems(chunkUrl = CHUNK) {{
  const url = `${{chunkUrl}}?load=${{loadPrefix}}.${{++loads}}`;
  let record;
  try {{
    const chunk = await import(url);
    record = {{ok: true, status: statusOf(url), version: chunk.VERSION, url}};
    window.chunkLoads.push(record);
    try {{
      record.items = await chunk.render(document.getElementById("items"));
      show("error", "");
    }} catch (err) {{
      record.renderError = String(err && err.message || err);
      show("error", record.renderError);
    }}
  }} catch (err) {{
    let status = statusOf(url);
    if (status === null) {{
      try {{ status = (await fetch(url, {{method: "HEAD", cache: "no-store"}})).status; }} catch (_) {{ status = null; }}
    }}
    record = {{ok: false, status, error: String(err && err.message || err), url}};
    window.chunkLoads.push(record);
    show("error", `could not load ${{chunkUrl}}: ${{record.error}}`);
    // A chunk that fails may be one the live release no longer has: learn whether we should move.
    checkVersion("chunk-failed");
  }}
  return record;
}}

async function checkVersion(reason = "manual") {{
  let live;
  try {{
    const response = await fetch("/version.json", {{cache: "no-store"}});
    if (!response.ok) throw new Error(`/version.json answered ${{response.status}}`);
    live = (await response.json()).version;
  }} catch (err) {{
    window.versionChecks.push({{reason, error: String(err && err.message || err)}});
    return null;
  }}
  window.versionChecks.push({{reason, live}});
  if (live === VERSION) {{
    // Up to date: a later release deserves its own one reload.
    sessionStorage.removeItem(GUARD);
    show("banner", "");
    return live;
  }}
  if (reloading) return live;
  if (sessionStorage.getItem(GUARD) === live) {{
    // We reloaded for this release already and still are not on it: never loop; tell the user.
    show("banner", `Version ${{live}} is live, this page is ${{VERSION}}: reload to update.`);
    return live;
  }}
  reloading = true;
  sessionStorage.setItem(GUARD, live);
  sessionStorage.setItem(RELOADS, String(Number(sessionStorage.getItem(RELOADS) || "0") + 1));
  // Unpinned first: a pin the page reload carries (a `path=/` cookie an older build set) would answer
  // the reload from this release again; and the reloaded page's chunks must not ask for this one.
  for (const path of [PIN_PATH, "/"]) document.cookie = `${{PIN_COOKIE}}=; path=${{path}}; max-age=0; SameSite=Lax`;
  location.reload();
  return live;
}}

async function watch() {{
  // One check at a time: the next is scheduled when this one is done.
  await checkVersion("interval");
  setTimeout(watch, CHECK_MS);
}}

window.loadItems = loadItems;
window.checkVersion = checkVersion;
setTimeout(watch, CHECK_MS);
loadItems();
"""
