"""`varcmp serve` (varcmp.serve.app) on a real uvicorn in a thread: the API answers what
`varcmp-search --json` writes, videos are served by id only (with range requests), nothing outside
the collection is reachable, concurrent requests are answered correctly, and the page works in a
real headless Chromium (type a query, see the first hit, click it, the player seeks into the span)."""
from __future__ import annotations

import http.client
import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import pytest
from click.testing import CliRunner

from varcmp.cache.reader import open_cache
from varcmp.cli.search import main as search_main
from varcmp.retrieval.search import Searcher
from varcmp.serve.app import create_app

QUERIES = ["a man hits a dog with a stick", "car on fire"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(extracted):
    """The app over the extracted cache, served by uvicorn on a free port; yields its base URL."""
    import uvicorn

    cache, ckpt = extracted
    searcher = Searcher(cache, ckpt, device="cpu", progress=False)
    app = create_app(searcher)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started
    yield f"127.0.0.1:{srv.config.port}"
    srv.should_exit = True
    thread.join(10)
    searcher.close()


def get(base: str, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    """One raw GET: the path goes on the wire as given (no client-side normalisation of `..`)."""
    conn = http.client.HTTPConnection(base, timeout=60)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def cli_json(extracted, query: str, top: int, tmp_path: Path) -> str:
    cache, ckpt = extracted
    out = tmp_path / f"{abs(hash(query))}-{top}.json"
    r = CliRunner().invoke(search_main, [str(cache), "--checkpoint", str(ckpt), query, "--top", str(top),
                                         "--json", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    return out.read_text(encoding="utf-8")


def test_the_api_answers_what_varcmp_search_json_writes(server, extracted, tmp_path):
    for q, top in ((QUERIES[0], 3), (QUERIES[1], 4)):
        status, head, body = get(server, f"/search?q={quote(q)}&top={top}")
        assert status == 200 and head["content-type"].startswith("application/json")
        assert body.decode("utf-8") == cli_json(extracted, q, top, tmp_path)
        assert len(json.loads(body)["queries"][0]["hits"]) == top
    status, _, body = get(server, "/search?q=%20&top=3")
    assert status == 400 and "empty query" in json.loads(body)["error"]
    assert get(server, "/search?q=dog&top=0")[0] == 400 and get(server, "/search?q=dog&top=101")[0] == 400


def test_the_page_is_self_contained(server):
    status, head, body = get(server, "/")
    page = body.decode("utf-8")
    assert status == 200 and head["content-type"].startswith("text/html")
    assert 'data-kind="text"' in page and 'id="q"' in page and 'id="player"' in page
    for bad in ('src="http', "src='http", 'href="http', "//cdn", "@import", "url(http"):
        assert bad not in page  # nothing is fetched from the network


def test_videos_by_id_with_range_requests_and_thumbnails(server, extracted, video_root):
    cache, _ = extracted
    with open_cache(cache) as c:
        s = c.split("test")
        row = int(s.done_index()[0])
        rel = str(s.paths[row])
    data = (video_root / rel).read_bytes()
    status, head, body = get(server, f"/video/test/{row}")
    assert status == 200 and body == data and head["accept-ranges"] == "bytes"
    status, head, body = get(server, f"/video/test/{row}", {"Range": "bytes=100-299"})
    assert status == 206 and body == data[100:300] and head["content-range"] == f"bytes 100-299/{len(data)}"
    status, head, body = get(server, f"/thumb/test/{row}?t=1.0")
    assert status == 200 and head["content-type"] == "image/jpeg" and body[:2] == b"\xff\xd8"


def test_nothing_outside_the_collection_is_reachable(server, extracted, video_root):
    """Paths, `..`, absolute paths and their percent-encoded forms, other ids: all 404."""
    cache, _ = extracted
    with open_cache(cache) as c:
        s = c.split("test")
        rows = [int(r) for r in s.done_index()]
        rel = str(s.paths[rows[0]])
    secret = video_root.parent / "secret.txt"
    secret.write_text("not a video")
    outside = str(secret)
    probes = ["/video/test/../../secret.txt", "/video/../../etc/passwd", "/video/test/..%2F..%2Fsecret.txt",
              "/video/%2e%2e/%2e%2e/etc/passwd", "/video/test/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
              "/video/test/%252e%252e%252fetc%252fpasswd", f"/video/test{outside}", f"/video/test/{quote(outside, '')}",
              "/video//etc/passwd", f"/video/test/{quote(rel, '')}", f"/video/test/{quote(rel)}",
              f"/video/{quote(str(video_root), '')}/{rows[0]}", "/video/test/-1", "/video/test/1.0",
              f"/video/test/{max(rows) + 1}", f"/video/test/{rows[0]}/..", "/video/train/0", "/video/test/%30x1",
              "/thumb/test/..%2F..%2Fsecret.txt?t=0", f"/thumb/other/{rows[0]}", "/etc/passwd",
              "/..%2F..%2Fetc%2Fpasswd", "/static/../../etc/passwd"]
    for p in probes:
        status, _, body = get(server, p)
        assert status == 404, (p, status, body[:200])
        assert b"root:" not in body and b"not a video" not in body
    # a stored path that leaves the root (a crafted cache) is refused even under its own id
    crafted = video_root.parent / "crafted.zarr"
    shutil.copytree(cache, crafted)
    import zarr

    g = zarr.open_group(str(crafted), mode="r+", use_consolidated=False)
    paths = g["test/videos/path"][:]
    paths[rows[0]] = "../secret.txt"
    g["test/videos/path"][:] = paths
    searcher = Searcher(crafted, extracted[1], device="cpu", progress=False)
    try:
        from fastapi.testclient import TestClient

        with TestClient(create_app(searcher)) as client:
            assert client.get(f"/video/test/{rows[0]}").status_code == 404
            assert client.get(f"/video/test/{rows[1]}").status_code == 200
    finally:
        searcher.close()


def test_concurrent_requests_are_answered_correctly(server):
    """Searches, video ranges and thumbnails at once: each answer equals its answer alone."""
    paths = [f"/search?q={quote(q)}&top={k}" for q in QUERIES for k in (2, 3)]
    alone = {p: get(server, p)[2] for p in paths}
    status, _, body = get(server, paths[0])
    row = json.loads(body)["queries"][0]["hits"][0]["row"]
    video = get(server, f"/video/test/{row}")[2]
    jobs = paths * 3 + [f"/video/test/{row}"] * 4
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        got = list(pool.map(lambda p: get(server, p, {"Range": "bytes=10-1009"} if "video" in p else None), jobs))
    for p, (status, _, body) in zip(jobs, got):
        if "video" in p:
            assert status == 206 and body == video[10:1010]
        else:
            assert status == 200 and body == alone[p], p


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
BROWSER_QUERIES = [*QUERIES, "two men fight in a parking lot", "people walk through a quiet shop", "a dog", "smoke",
                   "a crowd runs", "a red car", "night", "someone falls"]


@pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                    reason="no chromium and chromedriver on PATH (Debian: apt-get install chromium chromium-driver); "
                           "the page's API and files are still tested above")
def test_the_page_in_headless_chromium(server):
    """Type a query, see the expected first hit (varcmp-search's), click the hit whose span starts
    latest, and the player's currentTime lands inside that span."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    def hits_of(q):
        return json.loads(get(server, f"/search?q={quote(q)}&top=4")[2])["queries"][0]["hits"]

    # a query with a hit whose span does not start at 0, so that seeking is really tested
    query = next(q for q in BROWSER_QUERIES if max(h["span"]["start"] for h in hits_of(q)) > 0)
    expected = hits_of(query)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,900",
                "--autoplay-policy=no-user-gesture-required"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.get(f"http://{server}/")
        top = driver.find_element(By.ID, "top")
        top.clear()
        top.send_keys("4")
        driver.find_element(By.ID, "q").send_keys(query, Keys.ENTER)
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "article.hit")) == 4)
        hits = driver.find_elements(By.CSS_SELECTOR, "article.hit")
        assert [h.get_attribute("data-video") for h in hits] == [h["video"] for h in expected]
        assert f"#1 {expected[0]['video']}" in hits[0].text and f"score {expected[0]['score']:.4f}" in hits[0].text
        assert len(driver.find_elements(By.CSS_SELECTOR, "article.hit svg polyline")) == 8  # two curves each
        pick = max(range(4), key=lambda i: (expected[i]["span"]["start"], -i))
        span = expected[pick]["span"]
        hits[pick].click()
        wait.until(lambda d: d.execute_script("const v = document.getElementById('player'); "
                                              "return v.readyState >= 1 && !v.seeking && v.currentTime > 0;"))
        now = driver.execute_script("return document.getElementById('player').currentTime;")
        assert span["start"] - 1e-3 <= now <= span["end"], (now, span)
        thumbs = driver.execute_script("return [...document.querySelectorAll('article.hit img')]"
                                       ".map(i => i.complete && i.naturalWidth > 0);")
        assert thumbs == [True] * 4
    finally:
        driver.quit()


def test_an_audio_checkpoint_takes_an_uploaded_clip(video_root, tiny_clip, tiny_clap, tmp_path):
    """POST /search/audio with the clip as the body answers what `varcmp-search --audio CLIP --json`
    writes; the page offers a file chooser; text searches are refused in one line."""
    from fastapi.testclient import TestClient

    from varcmp.evaluate import zero_shot_model
    from varcmp.extract import Options
    from varcmp.extract import run as extract
    from varcmp.model import checkpoint

    cache = tmp_path / "xd.zarr"
    extract(Options(root=video_root, out=cache, split="test", clip_model=str(tiny_clip), clap_model=str(tiny_clap),
                    audio="video", workers=0, frames=8, audio_segments=6))
    with open_cache(cache) as c:
        ckpt = checkpoint.save(tmp_path / "run" / "best.safetensors", zero_shot_model(c.spec, "audio"),
                               {"cache": checkpoint.cache_fingerprint(c)})
    clip = video_root / "Abuse/Abuse001_x264.mp4"
    out = tmp_path / "a.json"
    searcher = Searcher(cache, ckpt, device="cpu", progress=False)
    try:
        with TestClient(create_app(searcher)) as client:  # the server builds the index; the command finds it
            r = CliRunner().invoke(search_main, [str(cache), "--checkpoint", str(ckpt), "--audio", str(clip),
                                                 "--top", "3", "--json", str(out), "--device", "cpu"])
            assert r.exit_code == 0, r.output
            got = client.post(f"/search/audio?top=3&name={quote(str(clip), '')}", content=clip.read_bytes())
            assert got.status_code == 200 and got.text == out.read_text(encoding="utf-8")
            assert 'data-kind="audio"' in client.get("/").text
            refused = client.get("/search?q=a+dog")
            assert refused.status_code == 400 and "audio queries" in refused.json()["error"]
            bad = client.post("/search/audio?top=3&name=notes.wav", content=b"not audio at all" * 100)
            assert bad.status_code == 400 and "\n" not in bad.json()["error"]
    finally:
        searcher.close()
