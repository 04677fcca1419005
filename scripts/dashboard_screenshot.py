"""Take the README's screenshot of the portal dashboard: a demo world served on loopback, drawn by headless Chromium.

    .venv/bin/python scripts/dashboard_screenshot.py                  # writes docs/img/dashboard.png
    .venv/bin/python scripts/dashboard_screenshot.py --out /tmp/d.png --keep-db /tmp/demo.db

The demo world lives in a throwaway SQLite file: a CloudMatrix384 pool with five slices (four with a deployment,
one without), two failed devices, an L0/L1/L2 catalog with first- and third-party entries, and four minutes of
recorded traffic. It is served by the dashboard router (`dashboard_router`, with an admin key checked by
`key_service.authenticate`) and opened in headless Chromium with the key in the URL fragment. The page keeps its
own tokens/s history, one point per poll; to give the sparkline something to show, this script replays the
recorded traffic on a clock of its own: each poll asks `dashboard_state` for the minute ending two seconds later
than the one before (`now=`). Everything else is `dashboard_state` over the real stores.
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from sqlalchemy.orm import Session

from matrixstack.fabric.loader import load_fabric
from matrixstack.matrix.failures import fail_device
from matrixstack.matrix.pools import create_pool, show_pool
from matrixstack.matrix.slices import alloc_slice
from matrixstack.matrix.spec import SliceRequest
from matrixstack.openai.server import ServerThread
from matrixstack.portal.catalog_service import add_entry
from matrixstack.portal.dashboard import dashboard_router, dashboard_state
from matrixstack.portal.deployment_service import register_deployment
from matrixstack.portal.key_service import authenticate, create_key
from matrixstack.portal.spec import BackendSpec, EntrySpec
from matrixstack.portal.store import open_portal_database
from matrixstack.portal.usage_service import UsageRecord, record_usage

OUT = Path(__file__).resolve().parent.parent / "docs" / "img" / "dashboard.png"
POOL = "cm384"
WINDOW = "1400,960"
POLLS = 90  # polls the page makes before the shot (2 s of virtual time each)
REPLAY_STEP_S = 2.0
TRAFFIC_S = 240  # seconds of recorded traffic before the first poll's moment
SEED = 7
SLICES = [  # (deployment or None, kind, arch, tenant, devices)
    ("deepseek-r1-decode", "engine", "deepseek-v3", "acme", 160),
    ("deepseek-r1-prefill", "engine", "deepseek-v3", "acme", 96),
    ("qwen3-235b", "vllm", "qwen3-235b-a22b", "acme", 32),
    ("tiny-moe", "engine", "tiny-moe", "lab", 2),
    (None, None, None, "globex", 16),  # a slice a tenant holds with nothing registered on it
]
ENTRIES = [
    EntrySpec(
        name="deepseek-r1",
        level="L0",
        provider="third-party",
        description="DeepSeek-R1 on CloudMatrix384 (disaggregated prefill/decode)",
        backend=BackendSpec(kind="engine", url="http://10.0.0.11:8001/v1", deployment="deepseek-r1-decode"),
    ),
    EntrySpec(
        name="qwen3-235b",
        level="L0",
        provider="third-party",
        backend=BackendSpec(kind="vllm", url="http://10.0.0.12:8000/v1", deployment="qwen3-235b", adapters=True),
    ),
    EntrySpec(
        name="tiny-moe",
        level="L0",
        backend=BackendSpec(kind="engine", url="http://10.0.0.13:8001/v1", deployment="tiny-moe"),
    ),
    EntrySpec(
        name="gpt-4o",
        level="L0",
        provider="third-party",
        backend=BackendSpec(kind="upstream", url="https://api.openai.com/v1", api_key="sk-upstream-demo"),
    ),
    EntrySpec(name="r1-finance", level="L1", parent="deepseek-r1", system_prompt="You are a financial analyst."),
    EntrySpec(name="r1-legal", level="L1", parent="deepseek-r1", system_prompt="You are a contracts lawyer."),
    EntrySpec(name="qwen3-medical", level="L1", parent="qwen3-235b", adapter="medical-lora"),
    EntrySpec(name="earnings-report", level="L2", parent="r1-finance", parameters={"temperature": 0.2}),
    EntrySpec(name="contract-review", level="L2", parent="r1-legal", stop=["</review>"]),
    EntrySpec(name="triage-assistant", level="L2", parent="qwen3-medical", owner="acme"),
    EntrySpec(name="gpt-4o-summarise", level="L2", parent="gpt-4o", provider="third-party"),
    EntrySpec(name="tiny-moe-python", level="L1", parent="tiny-moe", system_prompt="You answer from the Python docs."),
    EntrySpec(name="tiny-moe-python-grammar", level="L2", parent="tiny-moe-python", stop=["\n\n"]),
]
TRAFFIC = {  # entry -> (requests per second at peak, mean prompt tokens, mean completion tokens)
    "earnings-report": (1.6, 900, 420),
    "contract-review": (1.0, 1400, 300),
    "r1-finance": (0.8, 300, 260),
    "triage-assistant": (0.7, 200, 150),
    "gpt-4o-summarise": (0.5, 1200, 120),
    "tiny-moe-python-grammar": (0.4, 40, 60),
}


def build_world(url: str) -> tuple[str, datetime]:
    """Fill the database at `url` with the demo world; return the admin key and the moment of the first poll."""
    end = datetime.now(UTC).replace(microsecond=0)

    def build(session: Session) -> str:
        create_pool(session, POOL, [load_fabric("cloudmatrix384")])
        slice_ids = [alloc_slice(session, POOL, tenant, SliceRequest(devices=n)).id for *_, tenant, n in SLICES]
        decode = show_pool(session, POOL).slices[0]
        fail_device(session, POOL, (0, decode.devices[17]), reason="HBM ECC errors")  # replaced from free devices
        free = [d for d, owner in enumerate(show_pool(session, POOL).owners[0]) if owner == 0]
        fail_device(session, POOL, (0, free[len(free) // 2]), reason="UB link down")
        _, admin_key = create_key(session, "ops", name="dashboard", admin=True)
        user, _ = create_key(session, "acme", name="app")
        for (name, kind, arch, _, _), slice_id in zip(SLICES, slice_ids, strict=True):
            if name is not None:
                host = 11 + slice_ids.index(slice_id)
                register_deployment(
                    session, name, kind, f"http://10.0.0.{host}:8001/v1", arch=arch, pool=POOL, slice_id=slice_id
                )
        for spec in ENTRIES:
            add_entry(session, spec)
        record_usage(session, traffic(user.tenant_id, user.id, end))
        return admin_key

    with open_portal_database(url) as database:
        admin_key = database.write(build)
    return admin_key, end - timedelta(seconds=POLLS * REPLAY_STEP_S)


def traffic(tenant_id: int, key_id: int, end: datetime) -> list[UsageRecord]:
    """Return TRAFFIC_S + the replayed seconds of requests ending at `end`, in waves (seeded: the same each run)."""
    rng = random.Random(SEED)
    records = []
    span_s = TRAFFIC_S + int(POLLS * REPLAY_STEP_S)
    for second in range(span_s):
        wave = 0.6 + 0.4 * math.sin(2 * math.pi * second / 110.0) + 0.15 * math.sin(2 * math.pi * second / 37.0)
        for entry, (peak, prompt, completion) in TRAFFIC.items():
            for _ in range(_poisson(rng, peak * wave)):
                records.append(
                    UsageRecord(
                        tenant_id=tenant_id,
                        key_id=key_id,
                        entry=entry,
                        prompt_tokens=max(1, int(rng.gauss(prompt, prompt / 4))),
                        completion_tokens=max(1, int(rng.gauss(completion, completion / 3))),
                        status_code=200 if rng.random() > 0.01 else 502,
                        latency_ms=rng.uniform(400, 3000),
                        ttft_ms=rng.uniform(40, 400),
                        created_at=end - timedelta(seconds=span_s - second - rng.random()),
                    )
                )
    return records


def _poisson(rng: random.Random, mean: float) -> int:
    """Return a Poisson-distributed count with this mean (Knuth's method; small means only)."""
    limit, count, product = math.exp(-mean), 0, rng.random()
    while product > limit:
        count += 1
        product *= rng.random()
    return count


def demo_app(url: str, first: datetime) -> FastAPI:
    """Return an app serving the dashboard over the demo world, its clock starting at `first`, 2 s on per poll."""
    polls = iter(range(10**9))

    def authorize(request: Request) -> None:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        with open_portal_database(url) as database:
            info = database.read(lambda session: authenticate(session, key)) if scheme.lower() == "bearer" else None
        if info is None or not info.is_admin:
            raise HTTPException(401 if info is None else 403, "an admin key is required")

    def state() -> dict:
        now = first + timedelta(seconds=REPLAY_STEP_S * next(polls))
        with open_portal_database(url) as database:
            return database.read(lambda session: dashboard_state(session, now=now))

    app = FastAPI()
    app.include_router(dashboard_router(state, authorize))
    return app


def screenshot(page_url: str, out: Path, profile: Path) -> None:
    """Open the page in headless Chromium, let it poll POLLS times, and write the PNG to `out`."""
    binary = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if binary is None:
        sys.exit("no chromium binary on PATH; install Debian's `chromium` package")
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [
        binary,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--window-size={WINDOW}",
        f"--virtual-time-budget={int(POLLS * REPLAY_STEP_S * 1000) + 500}",
        f"--screenshot={out}",
        page_url,
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=300)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="PNG to write (default docs/img/dashboard.png)")
    parser.add_argument("--keep-db", type=Path, default=None, help="write the demo database here and keep it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="matrixstack-dashboard-") as tmp:
        db = args.keep_db or Path(tmp) / "demo.db"
        if db.exists():
            sys.exit(f"{db} exists; give --keep-db a new path")
        url = f"sqlite:///{db}"
        admin_key, first = build_world(url)
        with ServerThread(demo_app(url, first)) as server:
            screenshot(f"{server.url}/dashboard#key={admin_key}", args.out.resolve(), Path(tmp) / "chromium")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
