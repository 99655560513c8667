"""The web extension in a real browser: Debian's chromium, headless, driven by Playwright.

Boots ComfyUI with the pack and the tiny models, loads every example workflow through the page, queues
the tiny style workflow and checks the trainer node's chart, thumbnails and the replay after a reload.
Needs /usr/bin/chromium and the `playwright` package (scripts/setup_env.sh installs both; Playwright's
own browser download is never used).
"""
from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
from klein_lora_studio.devtools.server import ComfyServer
from klein_lora_studio.devtools.workflows import OUT, api_path, to_tiny
from klein_lora_studio.tests.conftest import COMFYUI, REPO
from klein_lora_studio.tests.helpers import write_concept_dataset

pytestmark = [pytest.mark.comfy, pytest.mark.browser]

CHROMIUM = os.environ.get("KLEIN_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
ARTIFACTS = REPO / "test-artifacts"
DOCS_SHOT = REPO / "docs" / "images" / "studio.png"
STEPS = 20
API = "window.comfyAPI?.api?.api ?? window.app.api"


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no chromium at {CHROMIUM}: run scripts/setup_env.sh (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (requirements-dev.txt)")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tiny, base_dir):
    write_concept_dataset(base_dir / "input" / "browser_ds", n=4, size=64)
    with ComfyServer(COMFYUI, base_dir) as url:
        yield url


def _settings(url: str, **values) -> None:
    """User settings through ComfyUI's API (first-run template dialog off, so it covers nothing)."""
    for key, value in values.items():
        req = urllib.request.Request(f"{url}/settings/{key}", data=json.dumps(value).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req).close()


def _open(page, url: str) -> None:
    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_function("() => window.app?.graph && window.__kleinLora && window.comfyAPI", timeout=90_000)
    page.wait_for_function("() => window.LiteGraph?.registered_node_types?.KleinLoRATrainer", timeout=60_000)


def _wait_history(url: str, prompt_id: str, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with urllib.request.urlopen(f"{url}/history/{prompt_id}") as r:
            h = json.load(r)
        if prompt_id in h and h[prompt_id].get("status", {}).get("completed") is not None:
            return h[prompt_id]
        time.sleep(0.5)
    raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s")


def test_panel_in_chromium_loads_workflows_charts_a_run_and_replays_it(server, browser):
    t0 = time.time()
    page = browser.new_page(viewport={"width": 1500, "height": 900})
    errors: list[str] = []
    page.on("console", lambda m: m.type == "error" and errors.append(f"console: {m.text} @ {m.location.get('url')}"))
    page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    _settings(server, **{"Comfy.TutorialCompleted": True})
    _open(page, server)

    # every drag-and-drop workflow loads with all node types known and no missing-node dialog
    ui_workflows = sorted(p for p in OUT.glob("*.json") if not p.name.endswith("_api.json"))
    assert ui_workflows, "no UI workflows in example_workflows/"
    for path in ui_workflows:
        result = page.evaluate("""async (wf) => {
            await app.loadGraphData(wf);
            await new Promise((r) => setTimeout(r, 300));
            const nodes = app.graph.nodes.map((n) => ({
                id: n.id, type: n.type, known: !!LiteGraph.registered_node_types[n.type],
                missing: !!(n.isMissing || n.last_serialization?.type_missing || n.constructor?.nodeData == null),
                widgets: Object.fromEntries((n.widgets ?? []).map((w) => [w.name, w.value]))}));
            const dialogs = [...document.querySelectorAll('.p-dialog, [role=dialog]')].map((d) => d.innerText);
            return {nodes, dialogs, panels: app.graph.nodes.filter((n) => n.kleinPanel).length};
        }""", json.loads(path.read_text()))
        bad = [n["type"] for n in result["nodes"] if not n["known"] or n["missing"]]
        assert not bad, f"{path.name}: missing node types {bad}"
        # the model files of the full-size workflow are absent here (a missing-models notice is expected)
        assert not [d for d in result["dialogs"] if "node" in d.lower() and "missing" in d.lower()], result["dialogs"]
        # every widget shows the value of the API twin: the UI file's widget order matches the frontend's
        api_twin = json.loads(api_path(path.stem).read_text())
        for n in result["nodes"]:
            want = {k: v for k, v in api_twin[str(n["id"])]["inputs"].items() if not isinstance(v, list)}
            got = {k: n["widgets"][k] for k in want if k in n["widgets"]}
            assert got == want, f"{path.name} node {n['id']} {n['type']}: widgets {got} != API inputs {want}"
        trainers = sum(n["type"] == "KleinLoRATrainer" for n in result["nodes"])
        assert result["panels"] == trainers, f"{path.name}: a trainer node has no chart panel"

    # queue the tiny style run from the page (its client id), the chart fills from the websocket
    page.evaluate("async (wf) => await app.loadGraphData(wf)", json.loads((OUT / "klein_style_lora.json").read_text()))
    api = to_tiny(json.loads(api_path("klein_style_lora").read_text()), "browser_ds", steps=STEPS,
                  save_every=10, output_name="browser_style")
    queued = page.evaluate(f"""async (prompt) => {{
        const api = {API};
        const res = await api.fetchApi('/prompt', {{method: 'POST', headers: {{'Content-Type': 'application/json'}},
                                                   body: JSON.stringify({{prompt, client_id: api.clientId}})}});
        return await res.json();
    }}""", api)
    assert "prompt_id" in queued, queued
    page.wait_for_function("() => window.__kleinLora.points >= 5", timeout=120_000)

    # reload during the run: the chart comes back from GET /klein_lora/history and goes on live
    at_reload = page.evaluate("() => window.__kleinLora.points")
    page.reload(wait_until="domcontentloaded")
    page.wait_for_function("() => window.app?.graph && window.__kleinLora", timeout=90_000)
    page.wait_for_function("() => window.__kleinLora.replayed > 0", timeout=30_000)
    done = _wait_history(server, queued["prompt_id"])
    assert done["status"]["status_str"] == "success", done["status"]
    # the page restores the open workflow; its trainer node draws the replayed + live run, each step once
    page.wait_for_function(f"""() => app.graph.getNodeById(6)?.kleinPanel?.status.textContent
                                  .includes('step {STEPS}/{STEPS}')""", timeout=30_000)
    steps = page.evaluate("() => app.graph.getNodeById(6).kleinPanel.run().points.map((p) => p[0])")
    assert steps == list(range(1, STEPS + 1)), steps
    status = page.evaluate("() => app.graph.getNodeById(6).kleinPanel.status.textContent")
    assert "it/s" in status, status
    print(f"reloaded at {at_reload}/{STEPS} points; after reload {status!r}")

    # samples: the trainer does not render checkpoint samples yet, so the page gets a samples event
    # pointing at a real image of this run (the loss graph the workflow saved) through the same listener
    img = done["outputs"]["7"]["images"][0]
    page.evaluate(f"""(detail) => {{
        const api = {API}, loss = app.graph.getNodeById(6).kleinPanel.run().ema.at(-1)[1];
        api.dispatchEvent(new CustomEvent('klein_lora.samples', {{detail}}));
        for (const [step, f] of [[5, 1.03], [10, 1.02], [15, 1.015], [20, 1.01]])
            api.dispatchEvent(new CustomEvent('klein_lora.validation', {{detail: {{node: '6', step, loss: loss * f}}}}));
    }}""", {"node": "6", "step": STEPS, "images": [img]})
    assert page.evaluate("() => window.__kleinLora.validation") == 4
    # frame the trainer node (thumbnails clickable, screenshot)
    page.evaluate("""() => {
        const n = app.graph.getNodeById(6), ds = app.canvas.ds;
        ds.scale = 1.0;
        ds.offset = [-n.pos[0] + 420, -n.pos[1] + 100];
        app.canvas.setDirty(true, true);
    }""")
    page.wait_for_timeout(500)
    # the log-scale toggle redraws the chart with other pixels
    chart = "() => app.graph.getNodeById(6).kleinPanel.canvas.toDataURL()"
    linear = page.evaluate(chart)
    page.locator(".klein-lora-head input[type=checkbox]").first.check()
    assert page.evaluate("() => app.graph.getNodeById(6).kleinPanel.log") is True
    assert page.evaluate(chart) != linear
    page.locator(".klein-lora-head input[type=checkbox]").first.uncheck()
    thumb = page.locator(".klein-lora-thumbs img").first
    thumb.wait_for(state="visible", timeout=10_000)
    page.wait_for_function("() => document.querySelector('.klein-lora-thumbs img').naturalWidth > 0", timeout=10_000)
    thumb.click()
    full = page.locator(".klein-lora-overlay img")
    full.wait_for(state="visible", timeout=10_000)
    assert page.evaluate("() => document.querySelector('.klein-lora-overlay img').naturalWidth") > 0
    page.locator(".klein-lora-overlay").click()
    assert page.locator(".klein-lora-overlay").count() == 0

    page.wait_for_timeout(300)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "studio.png"
    page.screenshot(path=str(shot))
    if os.environ.get("KLEIN_LORA_DOCS_SCREENSHOT") == "1":
        DOCS_SHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, DOCS_SHOT)
    print(f"screenshot: {shot}")

    ours = [e for e in errors if "klein" in e.lower()]
    assert not ours, ours
    print(f"browser test: {time.time() - t0:.1f} s; other console errors: {errors}")
