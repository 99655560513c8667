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
API = "(window.comfyAPI?.api?.api ?? window.app.api)"  # parenthesised: `a ?? b.f()` never calls f when a is set


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
        # and every link of the API twin arrives at its input (Autogrow slots such as loras.lora_2 included)
        prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
        for nid, node in api_twin.items():
            want = {k: v for k, v in node["inputs"].items() if isinstance(v, list)}
            got = {k: v for k, v in prompt.get(nid, {}).get("inputs", {}).items() if isinstance(v, list)}
            assert got == want, f"{path.name} node {nid} {node['class_type']}: links {got} != API links {want}"
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
    page.wait_for_function("() => window.__kleinLora.points >= 5", timeout=300_000)  # 120 s ran out at load 9

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

    # samples: this workflow connects no clip/vae to the trainer, so it does not sample; the page gets a samples
    # event pointing at a real image of this run (the loss graph the workflow saved) through the same listener
    img = done["outputs"]["7"]["images"][0]
    before = page.evaluate("() => window.__kleinLora.samples")
    page.evaluate(f"""(detail) => {API}.dispatchEvent(new CustomEvent('klein_lora.samples', {{detail}}))""",
                  {"node": "6", "step": STEPS, "images": [img]})
    assert page.evaluate("() => window.__kleinLora.samples") == before + 1
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

    # a run stopped at its peak: the klein_lora.stopped event marks the chart and the line below it says so
    before = page.evaluate("() => window.__kleinLora.stopMarks")
    page.evaluate(f"""(detail) => {API}.dispatchEvent(new CustomEvent('klein_lora.stopped', {{detail}}))""",
                  {"node": "6", "step": STEPS, "keep_step": STEPS // 2, "reason": "stopped at the peak after ..."})
    page.wait_for_function(f"() => window.__kleinLora.stopMarks > {before}", timeout=10_000)
    sub = page.evaluate("() => app.graph.getNodeById(6).kleinPanel.sub.textContent")
    assert f"stopped @{STEPS}, kept step {STEPS // 2}" in sub, sub
    assert page.evaluate("() => app.graph.getNodeById(6).kleinPanel.sub.title").startswith("stopped at the peak")
    assert page.evaluate(chart) != linear  # the marks are drawn

    ours = [e for e in errors if "klein" in e.lower()]
    assert not ours, ours
    print(f"browser test: {time.time() - t0:.1f} s; other console errors: {errors}")


# ------------------------------------------------------------------ the V3 schema features, as the frontend shows them

_PACK_INPUTS = """() => Object.fromEntries(Object.entries(LiteGraph.registered_node_types)
    .filter(([, t]) => String(t.nodeData?.python_module ?? "").includes("klein_lora_studio"))
    .map(([type, t]) => [type, Object.entries({...t.nodeData.input?.required, ...t.nodeData.input?.optional})
        .map(([name, spec]) => ({name, type: Array.isArray(spec[0]) ? "COMBO" : spec[0], opts: spec[1] ?? {}}))]))"""

_ADD = """(type) => {  // alone on the canvas, with a new id (the Vue node state of a reused id would carry over)
    for (const old of [...app.graph.nodes]) app.graph.remove(old);
    const n = LiteGraph.createNode(type);
    n.pos = [80, 80];
    app.graph.add(n);
    app.canvas.ds.offset = [0, 0]; app.canvas.ds.scale = 1; app.canvas.setDirty(true, true);
    return n.id;
}"""


def _lines(page, node_id: int) -> list[str]:
    """What the node shows (Vue nodes: its DOM), one label or value per line."""
    return [t.strip() for t in page.locator(f'[data-node-id="{node_id}"]').inner_text().split("\n") if t.strip()]


def _advanced_inputs_hide_behind_the_nodes_toggle(page, inputs: dict) -> set[str]:
    """The advanced widgets (the frontend hides widgets only: an advanced socket input stays a socket)."""
    with_advanced = {}
    for node_type, ins in inputs.items():
        advanced = [i for i in ins if i["opts"].get("advanced")]
        if not advanced:
            continue
        nid = page.evaluate(_ADD, node_type)
        widgets = set(page.evaluate("(id) => app.graph.getNodeById(id).widgets.map((w) => w.name)", nid))
        labels = [i["opts"].get("display_name") or i["name"] for i in advanced if i["name"] in widgets]
        if not labels:
            continue
        with_advanced[node_type] = labels
        page.locator(f'[data-node-id="{nid}"]').wait_for(state="visible", timeout=15_000)
        shown = _lines(page, nid)
        assert not set(labels) & set(shown), f"{node_type}: advanced inputs shown before the toggle: {labels}"
        toggle = page.locator(f'[data-node-id="{nid}"] [data-testid=advanced-inputs-button]')
        assert toggle.inner_text().strip() == "Show advanced inputs", (node_type, toggle.inner_text())
        toggle.click()
        page.wait_for_function("([id, l]) => l.every((x) => document.querySelector(`[data-node-id='${id}']`)"
                               ".innerText.split('\\n').map((s) => s.trim()).includes(x))", arg=[nid, labels],
                               timeout=10_000)
    return set(with_advanced)


def _dynamic_combos_show_an_options_inputs_only_when_chosen(page, inputs: dict) -> dict[str, dict]:
    seen = {}
    for node_type, ins in inputs.items():
        for combo in (i for i in ins if i["type"] == "COMFY_DYNAMICCOMBO_V3"):
            nid = page.evaluate(_ADD, node_type)
            for option in combo["opts"]["options"]:
                got = page.evaluate("""async ([id, name, key]) => {
                    const n = app.graph.getNodeById(id), w = n.widgets.find((w) => w.name === name);
                    w.value = key; w.callback?.(key);  // what choosing it in the widget does
                    await new Promise((r) => setTimeout(r, 400));
                    const inputs = (await app.graphToPrompt()).output[String(id)].inputs;
                    return {widgets: n.widgets.map((w) => w.name).filter((x) => x.startsWith(name + ".")),
                            prompt: Object.keys(inputs).filter((x) => x.startsWith(name + "."))};
                }""", [nid, combo["name"], option["key"]])
                own = sorted(f"{combo['name']}.{k}" for part in option["inputs"].values() for k in part)
                assert sorted(got["widgets"]) == own == sorted(got["prompt"]), (node_type, option["key"], got, own)
                labels = set(_lines(page, nid))
                others = {k for o in combo["opts"]["options"] if o["key"] != option["key"]
                          for part in o["inputs"].values() for k in part} - {k.split(".", 1)[1] for k in own}
                assert {k.split(".", 1)[1] for k in own} <= labels and not others & labels, (option["key"], labels)
                seen.setdefault(f"{node_type}.{combo['name']}", {})[option["key"]] = [k.split(".", 1)[1] for k in own]
    return seen


def _autogrow_slots_grow_when_the_last_is_connected(page, inputs: dict) -> dict[str, list[int]]:
    grown = {}
    for node_type, ins in inputs.items():
        for grow in (i for i in ins if i["type"] == "COMFY_AUTOGROW_V3"):
            template = grow["opts"]["template"]
            spec = next(iter({**template["input"].get("required", {}), **template["input"].get("optional", {})}
                             .values()))
            slot_type = "COMBO" if isinstance(spec[0], list) else spec[0]
            nid = page.evaluate(_ADD, node_type)
            counts = page.evaluate("""async ([id, name, type]) => {
                const n = app.graph.getNodeById(id), sleep = (ms) => new Promise((r) => setTimeout(r, ms));
                const slots = () => n.inputs.filter((i) => i.name.startsWith(name + "."));
                const fits = (o) => type === "*" || o === type || (Array.isArray(o) && type === "COMBO");
                const sources = Object.entries(LiteGraph.registered_node_types)
                    .filter(([, t]) => (t.nodeData?.output ?? []).some(fits));
                const source = sources.find(([name]) => name.startsWith("Primitive")) ?? sources[0];
                if (!source) return `no node outputs ${type}`;
                const counts = [slots().length];
                for (let k = 0; k < 2; k++) {
                    const src = LiteGraph.createNode(source[0]);
                    src.pos = [-400, 80 + 120 * k];
                    app.graph.add(src);
                    const out = src.constructor.nodeData.output.findIndex(fits);
                    src.connect(out, n, n.inputs.indexOf(slots().at(-1)));
                    await sleep(400);
                    counts.push(slots().length);
                }
                return counts;
            }""", [nid, grow["name"], slot_type])
            assert isinstance(counts, list), f"{node_type}.{grow['name']}: {counts}"
            assert counts[1] == counts[0] + 1 and counts[2] == counts[1] + 1, (node_type, grow["name"], counts)
            grown[f"{node_type}.{grow['name']}"] = counts
    return grown


def test_v3_inputs_work_in_the_frontend(server, browser):
    """With the frontend's Vue nodes: advanced inputs appear only after the node's 'Show advanced inputs' toggle;
    the trainer's recipe DynamicCombo shows rank/alpha/lr/steps for 'custom' only; Autogrow slots grow when the
    last one is connected. Every pack node with such an input is checked, read from the node definitions."""
    _settings(server, **{"Comfy.TutorialCompleted": True, "Comfy.VueNodes.Enabled": True})
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    try:
        _open(page, server)
        inputs = page.evaluate(_PACK_INPUTS)
        advanced = _advanced_inputs_hide_behind_the_nodes_toggle(page, inputs)
        combos = _dynamic_combos_show_an_options_inputs_only_when_chosen(page, inputs)
        grown = _autogrow_slots_grow_when_the_last_is_connected(page, inputs)
    finally:
        _settings(server, **{"Comfy.VueNodes.Enabled": False})
        page.close()
    print(f"advanced: {sorted(advanced)}; dynamic combos: {combos}; autogrow slot counts: {grown}")
    assert {"KleinLoRATrainer", "KleinBlockTargetSelector", "KleinDatasetLoader"} <= advanced, advanced
    recipe = combos.get("KleinLoRATrainer.recipe", {})
    assert recipe.get("custom") == ["alpha", "learning_rate", "rank", "steps"], combos
    assert len(recipe) > 1 and not any(v for k, v in recipe.items() if k != "custom"), combos
    assert any(k.startswith("KleinLoRAMerge.") for k in grown), f"the merge node has no Autogrow input: {grown}"
    assert not errors, errors
