"""Interactive web viewer for fitted fields: latent fields decoded live, RGB fields directly.

    python -m lrf.view results                      # every scene with a fitted field
    python -m lrf.view results/llff/fern --port 8080
    python -m lrf.view path/to/field.safetensors --scene-json path/to/scene.json --vae '{...}'
    python -m lrf.view --bench                      # frames per second of the live path

Built on viser (a web server plus a three.js client): the browser sends its camera, the server
renders the field at 1/8 resolution, decodes it with the method's decoder (the same files
lrf.evaluate uses) and sends the image back. Nothing here imports torch at module level, so
`--help` and the one-line errors stay quick.
"""
