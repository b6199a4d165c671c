"""The origin's nginx configuration for a directory store: the live release, every retained release's
hashed assets, and skew pinning.

- `/version.json` always answers the live release's (a pinned tab polls it to learn it should move).
- `/` and every entry point (index.html, version.json, ...) come from `current/`: the switch is the
  symlink's rename, nginx is never reloaded for it.
- `/assets/...` comes from the pinned release, then `current/`, then the pool of every retained
  release's assets, so a tab opened on another release keeps loading its chunks in either direction.
  A missing file is a 404, never index.html: an SPA fallback that answers a chunk with HTML and
  status 200 is what turns a deploy into `ChunkLoadError` in open tabs.
- Skew pinning: a client's deployment id (query `dpl`, header `x-deployment-id`, cookie `__dpl`, in
  that order; the cookie for assets only) serves its requests from `releases/<id>/` while that release
  is retained, and from the live one after. The id is matched against the version rule first: never a
  path, never `..`.

Entry points answer `Cache-Control: no-cache` (browsers revalidate every time), `Surrogate-Control:
max-age=300` (a CDN keeps them until the switch purges them) and `Surrogate-Key: frontend-entry` (what a
CDN purges by key); hashed assets are immutable for a year.
"""

from __future__ import annotations

import os
from pathlib import Path

from rollback.targets.frontend.store import ASSETS, CURRENT, POOL

ENTRY_SURROGATE_KEY = "frontend-entry"
CDN_ENTRY_TTL_SECONDS = 300
# The version rule (rollback.versions.VERSION_PATTERN, and no `..`) as an nginx map regex.
def _pinnable(capture: str) -> str:
    return f'"~^(?<{capture}>(?!.*\\.\\.)[A-Za-z0-9_][A-Za-z0-9._+-]{{0,63}})$"'
# Never a release name (versions start with a letter, digit or '_'): the pinned path that never exists.
_UNPINNED = "-"


def pinning_maps() -> str:
    """`$frontend_release` (assets: query, header or cookie) and `$frontend_entry_release` (entry points: query or
    header only): the pinned, validated deployment id, or `-`.

    The cookie never pins an entry point: it is shared by every tab, so a new tab or a reload would open on
    whatever release the last tab pinned, the rolled-back one included."""
    maps = []
    for variable, source in (("dpl_query", "$arg_dpl"), ("dpl_header", "$http_x_deployment_id"), ("dpl_cookie", "$cookie___dpl")):
        maps.append(f"map {source} ${variable} {{ default \"\"; {_pinnable(variable + '_id')} ${variable}_id; }}")
    maps.append('map "$dpl_query|$dpl_header|$dpl_cookie" $frontend_release {\n'
                f'        default {_UNPINNED};\n'
                '        "~^(?<q>[^|]+)\\|" $q;\n'
                '        "~^\\|(?<h>[^|]+)\\|" $h;\n'
                '        "~^\\|\\|(?<c>[^|]+)$" $c;\n'
                '    }')
    maps.append('map "$dpl_query|$dpl_header" $frontend_entry_release {\n'
                f'        default {_UNPINNED};\n'
                '        "~^(?<eq>[^|]+)\\|" $eq;\n'
                '        "~^\\|(?<eh>[^|]+)$" $eh;\n'
                '    }')
    return "\n    ".join(maps)


def server_block(*, root: Path, listen: str, api_upstream: str | None = None) -> str:
    """The `server { }` serving the store at `root` on `listen` (host:port); goes inside `http { }` after pinning_maps().
    `api_upstream` (host:port): where `/api/` goes, for a frontend that calls its backend on its own origin."""
    pinned, entry_pinned = "/releases/$frontend_release", "/releases/$frontend_entry_release"
    # No validators on entry points (no ETag, no Last-Modified, If-Modified-Since ignored). nginx derives
    # them from mtime and size: two releases built in the same second with same-sized pages share an ETag,
    # and a rollback goes back in time, so a browser revalidating its newer page with If-Modified-Since
    # gets 304 from the CDN holding the older one, and keeps the rolled-back page.
    entry_headers = ('etag off; if_modified_since off; add_header Last-Modified "" always; '
                     f'add_header Cache-Control "no-cache" always; add_header Surrogate-Control "max-age={CDN_ENTRY_TTL_SECONDS}" always; '
                     f'add_header Surrogate-Key "{ENTRY_SURROGATE_KEY}" always; '
                     'add_header X-Frontend-Pinned $frontend_entry_release always;')
    return f"""server {{
        listen {listen};
        root {root.resolve()};
        disable_symlinks off;
        etag on;
        # A miss is a short text 404: a chunk request never gets HTML it would try to run.
        error_page 404 @missing;
        location @missing {{ types {{ }} default_type text/plain; return 404 "not found\n"; }}
        # Dot-files are staging names (.current.v2.123) and partial uploads: never served.
        location ~ /\\. {{ return 404; }}
        location = /release.json {{ return 404; }}
{_api_location(api_upstream)}        # What is live, whoever asks: a pinned tab polls it to learn that it should move.
        location = /version.json {{
            try_files /{CURRENT}/version.json =404;
            {entry_headers}
        }}
        location = / {{
            try_files {entry_pinned}/index.html /{CURRENT}/index.html =404;
            {entry_headers}
        }}
        location /{ASSETS}/ {{
            try_files {pinned}$uri /{CURRENT}$uri /{POOL}$uri =404;
            add_header Cache-Control "public, max-age=31536000, immutable" always;
        }}
        location / {{
            try_files {entry_pinned}$uri /{CURRENT}$uri =404;
            {entry_headers}
        }}
    }}"""


def _api_location(api_upstream: str | None) -> str:
    if api_upstream is None:
        return ""
    return f"""        location /api/ {{
            proxy_pass http://{api_upstream};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_connect_timeout 1s;
            proxy_read_timeout 10s;
            proxy_max_temp_file_size 0;
        }}
"""


def nginx_conf(*, root: Path, listen: str, work_dir: Path, api_upstream: str | None = None) -> str:
    """A complete nginx.conf for an origin of its own (the tests and the demo run one)."""
    d = work_dir.resolve()
    temp = "\n    ".join(f"{kind}_temp_path {d}/tmp/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    # Workers started by root run as `nobody`, who cannot read a private directory (a test's tmp_path,
    # a user's checkout): serve as the user who owns the releases.
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""# generated by rollback.targets.frontend.origin
{user}worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    include_types;
    access_log {d}/access.log;
    {temp}
    {pinning_maps()}
    {server_block(root=root, listen=listen, api_upstream=api_upstream)}
}}
""".replace("include_types;", _MIME_TYPES)


# The types a static frontend ships; nginx-light's mime.types lives under /etc, which a private
# prefix does not see.
_MIME_TYPES = """types {
        text/html html;
        text/css css;
        application/javascript js mjs;
        application/json json map;
        image/svg+xml svg;
        image/png png;
        image/x-icon ico;
        font/woff2 woff2;
        text/plain txt;
    }
    default_type application/octet-stream;"""
