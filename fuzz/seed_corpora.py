#!/usr/bin/env python3
"""Seeds fuzz/corpus/<target>/ from the project's own fixtures: the recorded ComfyUI 0.8.0
transcripts (tests/fixtures/comfyui-0.8.0), proxy.toml, plus a few hand-made hostile inputs.
Run once from the repository root; libFuzzer grows the corpora from there (docs/fuzzing.md)."""
import glob, hashlib, json, os, struct

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "fuzz", "corpus")


def put(target, data):
    if isinstance(data, str):
        data = data.encode()
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, hashlib.sha1(data).hexdigest()), "wb") as f:
        f.write(data)


def multipart(fields, files, boundary="XyZ"):
    out = []
    for k, v in fields.items():
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n')
    for k, f in files.items():
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; '
                   f'filename="{f["filename"]}"\r\nContent-Type: image/png\r\n\r\n\x89PNG\r\n')
    out.append(f"--{boundary}--\r\n")
    return boundary + "\n" + "".join(out)


def ws_frame(text, opcode=1):
    payload = text.encode()
    mask = b"\x01\x02\x03\x04"
    head = bytes([0x80 | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    else:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


steps = []
for f in sorted(glob.glob(os.path.join(ROOT, "tests/fixtures/comfyui-0.8.0/*.json"))):
    steps += [s for s in json.load(open(f)).get("steps", []) if "http" in s]

for s in steps:
    h = s["http"]
    path = h["path"]
    if h["method"] == "POST" and path == "/prompt" and "json" in h:
        body = json.dumps(h["json"])
        put("prompt_submit", body)
        put("sim_validate", json.dumps(h["json"].get("prompt", {})))
        for node in (h["json"].get("prompt") or {}).values():
            image = isinstance(node, dict) and node.get("inputs", {}).get("image")
            if isinstance(image, str):
                put("file_refs", image)
    if path.startswith("/view"):
        query = path.split("?", 1)[1] if "?" in path else ""
        lines = [query] + [f"{k}: {v}" for k, v in h.get("headers", {}).items()]
        put("file_refs", "\n".join(lines))
    if "form" in h:
        form = h["form"]
        put("upload_form", multipart(form["fields"], form["files"]))
        if "original_ref" in form["fields"]:
            put("file_refs", form["fields"]["original_ref"])
    head = f'{h["method"]} {path} HTTP/1.1\r\nHost: 127.0.0.1:8188\r\n'
    for k, v in h.get("headers", {}).items():
        head += f"{k}: {v}\r\n"
    put("client_headers", head + "\r\n")

# Hostile graphs: a cycle, a deep chain, a link to nowhere, a non-numeric output index.
cycle = {"1": {"class_type": "ImageBlur", "inputs": {"image": ["2", 0], "blur_radius": 1, "sigma": 1.0}},
         "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 1, "sigma": 1.0}},
         "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "c"}}}
chain = {"0": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}}
for i in range(1, 300):
    chain[str(i)] = {"class_type": "ImageBlur", "inputs": {"image": [str(i - 1), 0], "blur_radius": 1, "sigma": 1.0}}
chain["out"] = {"class_type": "SaveImage", "inputs": {"images": ["299", 0], "filename_prefix": "d"}}
dangling = {"1": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "x"}}}
odd_link = {"1": {"class_type": "SaveImage", "inputs": {"images": ["1", "0"], "filename_prefix": "x"}}}
for g in (cycle, chain, dangling, odd_link):
    put("sim_validate", json.dumps(g))
    put("prompt_submit", json.dumps({"prompt": g, "client_id": "c1", "prompt_id": "p1", "front": True}))
put("prompt_submit", '{"prompt": 5}')
put("prompt_submit", '{"prompt": {}, "extra_data": []}')
put("prompt_submit", "[" * 64)

for v in ["../secret.png", "a/../../b.png [output]", "sub\\..\\x.png", "x.png [temp]", "%2e%2e/x", "\u00e9t\u00e9 \"q\".png"]:
    put("file_refs", v)
put("file_refs", "filename=example.png&type=input&preview=webp;50&channel=a")
put("file_refs", "filename=..%2F..%2Fetc%2Fpasswd&subfolder=..&type=output")
put("file_refs", "status=completed&sort_by=create_time&order=asc&limit=2&offset=1")

put("upload_form", multipart({"subfolder": "../../x", "type": "output"}, {"image": {"filename": "..\\e.png"}}))
put("upload_form", multipart({"original_ref": '{"filename": "a.png", "subfolder": "/abs"}'}, {"image": {"filename": "m.png"}}))

flags = json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
put("ws_client", b"clientId=abc\n" + ws_frame(flags) + ws_frame("hello") + ws_frame("", 9) + ws_frame("", 8))
put("ws_client", b"clientId=\n" + ws_frame('{"type": 1}') + ws_frame("x" * 300))
put("ws_client", b"clientId=%00%ff\n" + ws_frame(flags, 2))

for head in [
    "GET /prompt HTTP/1.1\r\nHost: localhost:8188\r\nOrigin: http://evil.example\r\n\r\n",
    "GET /ws HTTP/1.1\r\nHost: 127.0.0.1:8188\r\nOrigin: http://127.0.0.1:8188\r\nConnection: Upgrade, X-Secret\r\nUpgrade: websocket\r\nX-Secret: 1\r\n\r\n",
    "POST /prompt HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer s3cret\r\nComfy-User: al\r\nX-Forwarded-For: 1.2.3.4, 10.0.0.1\r\nForwarded: for=\"[2001:db8::1]:4711\";proto=https\r\n\r\n",
    "POST /prompt HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\nTE: trailers\r\nConnection: keep-alive, te, close\r\n\r\n",
]:
    put("client_headers", head)

for header in [
    b"PROXY TCP4 198.51.100.7 10.0.0.1 40000 8188\r\nGET / HTTP/1.1\r\n\r\n",
    b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 8188\r\n",
    b"PROXY UNKNOWN\r\n",
    b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x10\xc6\x33\x64\x07\x0a\x00\x00\x01\x9c\x40\x1f\xfc\x04\x00\x01\x00GET /",
    b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00",
    b"\r\n\r\n\x00\r\nQUIT\n\x21\x21\x00\x24" + bytes(range(16)) + bytes(range(16)) + b"\x9c\x40\x1f\xfc",
]:
    put("proxy_header", header)

put("config_file", open(os.path.join(ROOT, "proxy.toml")).read())
put("config_file", '[[backends]]\nurl = "http://127.0.0.1:8188"\n[placement]\npolicy = "most_free_vram"\n')
put("config_file", '[[backends]]\nname = "a"\nurl = "ftp://x"\ngpu = "uuid:GPU-1"\n[[backends]]\nname = "a"\n')
put("config_file", "[server]\nlisten = 5\n[recovery]\nmax_retries = -1\n")
put("config_file", '[edge]\ntrusted_proxies = ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"]\nreal_ip_header = "Forwarded"\nproxy_protocol = true\n[[backends]]\nurl = "http://a:1"\n')
