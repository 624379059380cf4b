"""The offscreen renderer: mujoco.Renderer's pixels, with one render context per set of assets."""

import numpy as np

from daptq.envs import make_env
from daptq.envs import render as render_module


def _reference_image(model, data, image_size: int, camera: str) -> np.ndarray:
    """What mujoco.Renderer gives with the same fast settings, turned upright as OffscreenRenderer does."""
    import mujoco

    renderer = mujoco.Renderer(model, height=image_size, width=image_size)
    try:
        renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = False
        renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = False
        renderer.update_scene(data, camera=camera)
        return np.ascontiguousarray(renderer.render()[::-1, ::-1])
    finally:
        renderer.close()


def test_shared_context_renders_what_mujoco_renderer_renders_and_is_released():
    envs = [make_env("push", image_size=32, camera="corner3", max_steps=10) for _ in range(2)]
    contexts = [env._renderers[0]._context for env in envs]
    users = contexts[0].users  # other tests' envs with the same assets may still be open
    try:
        assert contexts[0] is contexts[1] and users >= 2  # two envs, one context
        for seed, env in zip((0, 7), envs, strict=True):
            env.reset(seed=seed)
            for _ in range(2):
                obs, *_ = env.step(np.array([0.6, -0.4, 0.3, 1.0], np.float32))
            image = np.asarray(obs["image"])
            expected = _reference_image(env._mw.model, env._mw.data, 32, "corner3")
            np.testing.assert_array_equal(image, expected)
            assert image.std() > 1  # a real picture, not a cleared buffer
        # Different seeds put the objects elsewhere: the shared context renders each env's own scene.
        assert not np.array_equal(envs[0].render(), envs[1].render())
    finally:
        for env in envs:
            env.close()
    assert contexts[0].users == users - 2
    if contexts[0].users == 0:  # the last user parks it, idle, for the next env of the same assets
        assert contexts[0].key not in render_module._SharedContext._open
        assert render_module._SharedContext._idle is contexts[0]
        again = make_env("push", image_size=32, camera="corner3", max_steps=10)
        try:
            assert again._renderers[0]._context is contexts[0]  # reused, not rebuilt
            again.reset(seed=0)
            obs, *_ = again.step(np.array([0.6, -0.4, 0.3, 1.0], np.float32))
            expected = _reference_image(again._mw.model, again._mw.data, 32, "corner3")
            np.testing.assert_array_equal(np.asarray(obs["image"]), expected)
        finally:
            again.close()


def test_only_the_last_released_context_is_kept_idle():
    # Buffer sizes no other test uses give contexts of their own (the key covers the offscreen size).
    first = make_env("push", image_size=997, camera="corner3", max_steps=10)
    parked = first._renderers[0]._context
    first.close()
    assert parked.users == 0 and render_module._SharedContext._idle is parked
    other = make_env("push", image_size=998, camera="corner3", max_steps=10)
    context = other._renderers[0]._context
    assert context is not parked
    other.close()
    assert render_module._SharedContext._idle is context  # the earlier one was freed for it
    again = make_env("push", image_size=997, camera="corner3", max_steps=10)
    try:
        assert again._renderers[0]._context is not parked  # freed: a new one was built
    finally:
        again.close()
