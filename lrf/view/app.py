"""The viser application: per-browser-tab GUI, camera frusta, and a render loop per tab.

Each tab gets its own worker thread. It renders when the tab's camera or settings change: at the
moving resolution while the camera moves (adapted after every frame toward --fps), and once more
at the full resolution when the camera has been still for SETTLE seconds.
"""
from __future__ import annotations

import contextlib
import io
import logging
import threading
import time
from dataclasses import dataclass

import numpy as np

from lrf.view.render import (Renderer, Timing, compose, pose_to_w2c, to_uint8, vertical_fov, w2c_to_pose)
from lrf.view.sources import SceneSource

log = logging.getLogger("lrf.view")

SETTLE = 0.25       # seconds without a camera update before the full-resolution frame
MIN_PX = 64


@dataclass
class ViewSettings:
    max_px: int = 512        # longer side when the camera is still
    moving_px: int = 256     # longer side while it moves (adapted)
    fps: float = 6.0         # target while moving
    adapt: bool = True
    jpeg_quality: int = 85


class LoadedScene:
    """A scene's cameras (if it has a scene file) and the orbit focus / up direction."""

    def __init__(self, src: SceneSource):
        from lrf.field.orbit import scene_focus
        from lrf.scene.model import Scene

        self.src = src
        self.scene = Scene.load(src.scene_json) if src.scene_json is not None else None
        if self.scene is not None and self.scene.cameras:
            cams = self.scene.cameras
            self.focus = scene_focus(self.scene)
            down = np.mean([c.w2c[1, :3] for c in cams], 0)
            self.up = -down / max(np.linalg.norm(down), 1e-12)
            C = np.stack([c.center for c in cams])
            self.extent = float(max(np.linalg.norm(C - C.mean(0), axis=1).max(), 1e-3))
            home = self.scene.train[0] if self.scene.train else 0
            self.home_w2c = cams[home].w2c
            self.home_fov = vertical_fov(cams[home].K, cams[home].height)
        else:   # a bare field: look at its Gaussians from outside their spread
            self.focus, self.up, self.extent, self.home_w2c, self.home_fov = None, np.array([0.0, -1.0, 0.0]), 1.0, None, 0.9

    def home_from_field(self, means: np.ndarray) -> None:
        from lrf.field.orbit import look_at_w2c

        c = np.median(means, 0)
        spread = float(np.percentile(np.linalg.norm(means - c, axis=1), 90))
        self.focus, self.extent = c, max(spread, 1e-3)
        self.home_w2c = look_at_w2c(c - np.array([0.0, 0.0, 2.5 * self.extent]), c, -self.up)

    def view_names(self, split: str) -> list[str]:
        if self.scene is None:
            return []
        return [self.scene.cameras[i].name for i in self.scene.split(split)]

    def camera(self, name: str):
        i = next(i for i, c in enumerate(self.scene.cameras) if c.name == name)
        return i, self.scene.cameras[i]


class Viewer:
    """Owns the viser server, the renderer and the tabs."""

    def __init__(self, scenes: dict[str, SceneSource], renderer: Renderer, settings: ViewSettings,
                 host: str, port: int, first_scene: str | None = None, first_method: str | None = None):
        import viser

        self.sources = scenes
        self.renderer = renderer
        self.settings = settings
        self._loaded: dict[str, LoadedScene] = {}
        self._lock = threading.Lock()
        self.first_scene = first_scene or next(iter(scenes))
        self.first_method = first_method
        self.tabs: dict[int, Tab] = {}
        self._stopping = False
        logging.getLogger("websockets").setLevel(logging.WARNING)
        with contextlib.redirect_stdout(io.StringIO()):   # viser's banner: we print our own line
            self.server = viser.ViserServer(host=host, port=port, label="lrf viewer", verbose=False)
        # No share tunnel: the viewer stays on this machine (SSH users forward the port).
        self.server.gui.configure_theme(show_share_button=False)
        self.server.request_share_url = lambda *a, **k: None
        self.server.on_client_connect(self._connect)
        self.server.on_client_disconnect(self._disconnect)

    def scene(self, key: str) -> LoadedScene:
        with self._lock:
            if key not in self._loaded:
                ls = LoadedScene(self.sources[key])
                if ls.home_w2c is None:
                    first = next(iter(ls.src.methods.values()))
                    field, _ = self.renderer.field(first.field)
                    ls.home_from_field(field.means.detach().numpy().astype(np.float64))
                self._loaded[key] = ls
            return self._loaded[key]

    def _connect(self, client) -> None:
        if self._stopping:
            return
        tab = Tab(self, client)
        self.tabs[client.client_id] = tab
        tab.start()

    def _disconnect(self, client) -> None:
        tab = self.tabs.pop(client.client_id, None)
        if tab is not None:
            tab.stop()

    def stop(self) -> None:
        self._stopping = True
        for tab in list(self.tabs.values()):
            tab.stop()
        with contextlib.redirect_stdout(io.StringIO()):
            self.server.stop()


class Tab:
    """One browser tab: its GUI, its frusta, its render loop."""

    def __init__(self, viewer: Viewer, client):
        self.v, self.client = viewer, client
        self.settings = ViewSettings(**vars(viewer.settings))
        self._wake = threading.Event()
        self._halt = threading.Event()
        self._send = threading.Lock()   # held while a frame goes out; stop() waits on it
        self._last_move = 0.0
        self._version = 0          # bumps on every settings change
        self._frames = 0
        self._frusta = []
        self._thread = threading.Thread(target=self._loop, name=f"lrf-view-{client.client_id}", daemon=True)
        self.scene_key = viewer.first_scene
        self._build_gui()
        self._show_scene(initial=True)
        client.camera.on_update(self._on_camera)

    # -- GUI
    def _build_gui(self) -> None:
        gui = self.client.gui
        keys = list(self.v.sources)
        self.g_scene = gui.add_dropdown("Scene", keys, initial_value=self.scene_key, visible=len(keys) > 1)
        self.g_method = gui.add_dropdown("Method", ["-"])
        self.g_compare = gui.add_dropdown("Compare with", ["none"], hint="split view: this method on the right")
        self.g_split = gui.add_slider("Split", 0.05, 0.95, 0.01, 0.5, visible=False)
        self.g_res = gui.add_slider("Resolution", 128, 1024, 32, self.settings.max_px,
                                    hint="longer side in pixels when the camera is still")
        self.g_status = gui.add_markdown("waiting for the first frame")
        with gui.add_folder("Held-out view"):
            self.g_view = gui.add_dropdown("View", ["-"])
            self.g_snap = gui.add_button("Snap to held-out view")
            self.g_psnr = gui.add_markdown("")
            blank = np.zeros((8, 8, 3), np.uint8)
            self.g_photo = gui.add_image(blank, label="photo", visible=False)
            self.g_render = gui.add_image(blank, label="render", visible=False)
            self.g_render2 = gui.add_image(blank, label="render (compared)", visible=False)

        @self.g_scene.on_update
        def _(_):
            self.scene_key = self.g_scene.value
            self._show_scene(initial=True)

        for h in (self.g_method, self.g_compare, self.g_split, self.g_res):
            h.on_update(lambda _: self._changed())

        @self.g_snap.on_click
        def _(event):
            if self.g_view.value in self.ls.view_names("test"):
                self.snap(self.g_view.value)

    def _changed(self) -> None:
        self.g_split.visible = self.g_compare.value != "none"
        self._version += 1
        self._wake.set()

    def _show_scene(self, initial: bool = False) -> None:
        """Method lists, held-out views and frusta of the current scene; camera to its home view."""
        self.ls = self.v.scene(self.scene_key)
        methods = list(self.ls.src.methods)
        latent = [m for m, src in self.ls.src.methods.items() if src.kind == "latent"]
        # a latent field first (it is what this viewer is for), whatever order METHODS lists them in
        first = self.v.first_method if self.v.first_method in methods else (latent or methods)[0]
        self.g_method.options = methods
        self.g_method.value = first
        self.g_compare.options = ["none"] + methods
        self.g_compare.value = "none"
        tests = self.ls.view_names("test")
        self.g_view.options = tests or ["-"]
        self.g_view.value = tests[0] if tests else "-"
        self.g_snap.disabled = not tests
        for f in self._frusta:
            f.remove()
        self._frusta = []
        sc = self.ls.scene
        if sc is not None:
            scale = 0.06 * self.ls.extent
            for i, cam in enumerate(sc.cameras):
                wxyz, pos = w2c_to_pose(cam.w2c)
                test = cam.split == "test"
                h = self.client.scene.add_camera_frustum(
                    f"/cameras/{'test' if test else 'train'}/{i:04d}", fov=vertical_fov(cam.K, cam.height),
                    aspect=cam.width / cam.height, scale=scale, thickness=1.5, thickness_units="screen",
                    color=(230, 120, 20) if test else (60, 60, 60), wxyz=wxyz, position=pos)
                h.on_click(lambda event, name=cam.name: self.snap(name))
                self._frusta.append(h)
        if initial:
            self.set_camera(self.ls.home_w2c, self.ls.home_fov)
        self._changed()

    def set_camera(self, w2c: np.ndarray, fov: float) -> None:
        wxyz, pos = w2c_to_pose(w2c)
        cam = self.client.camera
        with self.client.atomic():
            cam.position = pos
            cam.wxyz = wxyz
            if self.ls.focus is not None:   # orbit about the scene's focus depth along the view
                fwd = np.linalg.inv(w2c)[:3, 2]
                d = float(np.dot(self.ls.focus - pos, fwd))
                cam.look_at = pos + fwd * (d if d > 1e-3 else self.ls.extent)
            cam.fov = fov

    # -- held-out views
    def snap(self, name: str) -> None:
        """Move the camera to a scene view; render it as lrf.evaluate does (each method shown);
        show the photo, the renders and their PSNR."""
        i, cam = self.ls.camera(name)
        self.set_camera(cam.w2c, vertical_fov(cam.K, cam.height))
        try:
            self._score(name, i, cam)
        except Exception as e:  # noqa: BLE001 - e.g. the photos are not where the scene file says
            log.warning("snap to %s: %s", name, e)
            self.g_psnr.content = f"cannot score `{name}`: {str(e).splitlines()[0][:300]}"
            self.g_photo.visible = self.g_render.visible = self.g_render2.visible = False

    def _score(self, name: str, i: int, cam) -> None:
        from lrf.metrics import psnr
        import torch

        methods = self.ls.src.methods
        shown = [methods[self.g_method.value]]
        if self.g_compare.value != "none":
            shown.append(methods[self.g_compare.value])
        photo = self.ls.scene.load_image(i)
        which = "held-out" if cam.split == "test" else "training"
        lines, preds, self.last_snap = [], [], []
        for m in shown:
            t0 = time.perf_counter()
            pred = self.v.renderer.exact(m, cam)
            p = psnr(torch.from_numpy(pred).permute(2, 0, 1)[None], torch.from_numpy(photo).permute(2, 0, 1)[None])
            ms = (time.perf_counter() - t0) * 1e3
            ref = m.per_view_psnr().get(name)
            note = f" (evaluate: {ref:.2f} dB)" if ref is not None else ""
            lines.append(f"**{m.name}** on {which} view `{name}`: PSNR **{p:.2f} dB**{note} · {ms:.0f} ms")
            preds.append(pred)
            self.last_snap.append({"view": name, "method": m.name, "psnr": p})
        self.g_psnr.content = "\n\n".join(lines)
        self.g_photo.image, self.g_render.image = to_uint8(photo), to_uint8(preds[0])
        self.g_render.label = f"render: {shown[0].name}"
        self.g_photo.visible = self.g_render.visible = True
        self.g_render2.visible = len(preds) > 1
        if len(preds) > 1:
            self.g_render2.image, self.g_render2.label = to_uint8(preds[1]), f"render: {shown[1].name}"

    # -- render loop
    def _on_camera(self, _camera) -> None:
        self._last_move = time.monotonic()
        self._wake.set()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Halt the loop. A frame still rendering is dropped, never sent after stop() returns."""
        self._halt.set()
        self._wake.set()
        with self._send:
            pass
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    def _state(self):
        c = self.client.camera
        return (tuple(np.round(c.wxyz, 6)), tuple(np.round(c.position, 6)), round(float(c.fov), 6),
                round(float(c.aspect), 4), self._version)

    def _loop(self) -> None:
        done_key, done_still = None, False
        while not self._halt.is_set():
            self._wake.wait(timeout=0.05)
            self._wake.clear()
            if self._halt.is_set():
                break
            try:
                key = self._state()
            except AssertionError:   # no camera message from this tab yet
                continue
            moving = time.monotonic() - self._last_move < SETTLE
            if key == done_key and (done_still or moving):
                continue
            still = not moving
            try:
                self._frame(still)
            except Exception as e:  # noqa: BLE001 - keep the tab alive; say what failed
                log.exception("render failed")
                self.g_status.content = f"render failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                self._halt.wait(1.0)
            done_key, done_still = key, still

    def _frame(self, still: bool) -> None:
        s = self.settings
        s.max_px = int(self.g_res.value)
        c = self.client.camera
        w2c = pose_to_w2c(c.wxyz, c.position)
        methods = self.ls.src.methods
        left = methods[self.g_method.value]
        right = methods.get(self.g_compare.value) if self.g_compare.value != "none" else None
        canvas = max(int(c.image_width), int(c.image_height), MIN_PX)
        px = min(s.max_px, canvas) if still else min(s.moving_px, s.max_px, canvas)
        tm = Timing()
        t0 = time.perf_counter()
        img = compose(self.v.renderer, left, right, w2c, float(c.fov), float(c.aspect), px,
                      float(self.g_split.value), tm)
        t1 = time.perf_counter()
        with self._send:   # nothing goes out once stop() has begun: the connection may be gone
            if self._halt.is_set():
                return
            self.client.scene.set_background_image(img, format="jpeg", jpeg_quality=s.jpeg_quality)
            dt = time.perf_counter() - t0
            if not still and s.adapt:   # aim the next moving frame at the target rate
                want = s.moving_px * float(np.sqrt((1.0 / s.fps) / max(dt, 1e-3)))
                s.moving_px = int(np.clip(0.5 * s.moving_px + 0.5 * want, MIN_PX, s.max_px)) // 8 * 8
            self._frames += 1
            name = left.name + (f" | {right.name}" if right else "")
            self.g_status.content = (f"frame {self._frames} · **{name}** · {img.shape[1]}×{img.shape[0]} "
                                     f"{'still' if still else 'moving'} · {dt * 1e3:.0f} ms "
                                     f"(render {tm.render_ms:.0f}, decode {tm.decode_ms:.0f}, "
                                     f"send {(dt - (t1 - t0)) * 1e3:.0f})")
