"""Klein LoRA Studio: train FLUX.2 [klein] Base LoRAs inside ComfyUI.

ComfyUI imports this at start-up; it stays cheap (no torch work, no peft, no models): the nodes
module is imported when ComfyUI asks for the node list.
"""
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import comfy_entrypoint as entry

    return await entry()
