//! ComfyUI's file rules, shared by comfy-sim and the gate: the `input/`, `output/` and `temp/`
//! layout, the save-path counter, `/view` with its path checks, and `/upload/image|mask` with its
//! collision rules. The gate keeps uploads by the same rules, so a client sees one ComfyUI.

pub mod images;
pub mod refs;
pub mod serve;

use std::path::{Component, Path, PathBuf};

use http::{HeaderMap, Method, Response, StatusCode, header};
use sha2::{Digest, Sha256};

use crate::files::images::Image;
use crate::http::{Body, full, status};

/// The instance's directories.
#[derive(Debug, Clone)]
pub struct Dirs {
    pub base: PathBuf,
    pub input: PathBuf,
    pub output: PathBuf,
    pub temp: PathBuf,
    pub user: PathBuf,
}

impl Dirs {
    /// Creates the directory layout under `base`; `temp/` is emptied as at every ComfyUI start.
    pub fn create(base: &Path) -> std::io::Result<Self> {
        let dirs = Self {
            base: base.to_path_buf(),
            input: base.join("input"),
            output: base.join("output"),
            temp: base.join("temp"),
            user: base.join("user"),
        };
        let _ = std::fs::remove_dir_all(&dirs.temp);
        for d in [&dirs.input, &dirs.output, &dirs.temp, &dirs.user] {
            std::fs::create_dir_all(d)?;
        }
        Ok(dirs)
    }

    /// `folder_paths.get_directory_by_type`.
    pub fn by_type(&self, kind: &str) -> Option<&Path> {
        match kind {
            "output" => Some(&self.output),
            "temp" => Some(&self.temp),
            "input" => Some(&self.input),
            _ => None,
        }
    }

    /// The path of `r` in its type's directory; `None` for an unknown type or a path that would
    /// leave that directory (checked on the joined path, whatever the reference's parser
    /// let through).
    pub fn path_of(&self, r: &refs::FileRef) -> Option<PathBuf> {
        let base = self.by_type(r.kind.as_str())?;
        let path = base.join(&r.subfolder).join(&r.name);
        let inside = normalize(&path).starts_with(normalize(base))
            && !r.name.is_empty()
            && !r.name.contains(['/', '\0'])
            && r.name != ".."
            && r.name != ".";
        inside.then_some(path)
    }

    /// `annotated_filepath`: strips a ` [output]`/` [input]`/` [temp]` suffix
    /// ([`refs::split_annotation`]) and names its directory.
    pub fn annotated<'a>(&self, name: &'a str) -> (&'a str, Option<&Path>) {
        let (name, kind) = refs::split_annotation(name);
        (name, kind.and_then(|k| self.by_type(k.as_str())))
    }

    /// `get_annotated_filepath` with the input directory as default.
    pub fn annotated_path(&self, name: &str) -> PathBuf {
        let (name, dir) = self.annotated(name);
        dir.unwrap_or(&self.input).join(name)
    }

    /// Image files at the top of `input/`, sorted (LoadImage's combo list).
    pub fn input_images(&self) -> Vec<String> {
        let mut files: Vec<String> = std::fs::read_dir(&self.input)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| is_image_name(n))
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files
    }

    /// `get_save_image_path`: folder, file stem, next counter and subfolder for a prefix.
    pub fn save_path(
        &self,
        base: &Path,
        prefix: &str,
    ) -> Result<(PathBuf, String, u32, String), String> {
        let norm = normalize(Path::new(prefix));
        let filename = norm
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let subfolder = norm
            .parent()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let folder = normalize(&base.join(&subfolder));
        if !folder.starts_with(base) {
            return Err(format!(
                "**** ERROR: Saving image outside the output folder is not allowed.\n full_output_folder: {}\n         output_dir: {}",
                folder.display(),
                base.display()
            ));
        }
        let plen = filename.chars().count();
        let counter = std::fs::read_dir(&folder)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter_map(|f| {
                        let chars: Vec<char> = f.chars().collect();
                        if chars.len() <= plen {
                            return None;
                        }
                        let head: String = chars[..plen].iter().collect();
                        if head != filename || chars[plen] != '_' {
                            return None;
                        }
                        let rest: String = chars[plen + 1..].iter().collect();
                        Some(rest.split('_').next()?.parse::<u32>().unwrap_or(0))
                    })
                    .max()
                    .map(|m| m + 1)
                    .unwrap_or(1)
            })
            .unwrap_or(1);
        std::fs::create_dir_all(&folder).map_err(|e| e.to_string())?;
        Ok((folder, filename, counter, subfolder))
    }
}

fn is_image_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    [
        ".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff",
    ]
    .iter()
    .any(|ext| lower.ends_with(ext))
}

/// Lexical normalisation (`os.path.normpath`): drops `.`, resolves `..` against what precedes.
/// A `..` that has nothing to cancel is kept (`../..` stays `../..`, it must not cancel the
/// `..` before it); at the root it stays at the root.
pub fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => match out.components().next_back() {
                Some(Component::Normal(_)) => {
                    out.pop();
                }
                Some(Component::RootDir) | Some(Component::Prefix(_)) => {}
                _ => out.push(".."),
            },
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// `GET /view` and `HEAD /view` (reference §4.11, `server.py::view_image`): the path checks of
/// [`refs::FileRef::from_view`]; `preview`/`channel` re-encode an image (a whole body); else the
/// file as aiohttp's `FileResponse` serves it ([`serve::serve_file`]: ranges, validators, HEAD).
pub fn view(
    dirs: &Dirs,
    query: &[(String, String)],
    method: &Method,
    headers: &HeaderMap,
) -> Response<Body> {
    let get = |k: &str| query.iter().find(|(q, _)| q == k).map(|(_, v)| v.as_str());
    let reference = match refs::FileRef::from_view(get("filename"), get("subfolder"), get("type")) {
        Ok(r) => r,
        Err(code) => return status(code),
    };
    let Some(file) = dirs.path_of(&reference) else {
        return status(StatusCode::FORBIDDEN);
    };
    let basename = reference.name.clone();
    if !file.is_file() {
        return status(StatusCode::NOT_FOUND);
    }
    let disposition = format!("filename=\"{basename}\"");
    let channel = get("channel").unwrap_or("rgba");
    if get("preview").is_some() || channel == "rgb" || channel == "a" {
        let Ok(bytes) = std::fs::read(&file) else {
            return status(StatusCode::NOT_FOUND);
        };
        let respond = |body: Vec<u8>, ctype: &str| {
            let mut resp = Response::new(full(body));
            let h = resp.headers_mut();
            if let Ok(v) = ctype.parse() {
                h.insert(header::CONTENT_TYPE, v);
            }
            if let Some(v) = serve::disposition_value(&disposition) {
                h.insert(header::CONTENT_DISPOSITION, v);
            }
            resp
        };
        let Ok((img, alpha)) = Image::from_png(&bytes) else {
            return crate::http::text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "500 Internal Server Error\n\nServer got itself in trouble",
            );
        };
        // `preview=<format>[;<quality>]`: jpeg or webp; anything else, or an alpha channel
        // asked for, is webp (ComfyUI's `server.py` `view_image`).
        if let Some(preview) = get("preview") {
            let format = preview.split(';').next().unwrap_or("");
            return if format == "jpeg" && !channel.contains('a') {
                respond(img.to_jpeg(), "image/jpeg")
            } else {
                respond(img.to_webp(), "image/webp")
            };
        }
        if channel == "rgb" {
            return respond(img.to_png(&[], true), "image/png");
        }
        let a = alpha.unwrap_or_else(|| vec![255; (img.width * img.height) as usize]);
        let mask = Image {
            width: img.width,
            height: img.height,
            rgb: a.iter().flat_map(|v| [*v, *v, *v]).collect(),
        };
        return respond(mask.to_png(&[], true), "image/png");
    }
    serve::serve_file(
        &file,
        method,
        headers,
        &content_type(&basename),
        Some(&disposition),
    )
}

/// `/view`'s `Content-Type`: guessed from the extension, `application/octet-stream` when unknown
/// and for types a browser would run (`text/html`, `application/xhtml+xml`, `text/javascript`,
/// `text/css`).
pub fn content_type(name: &str) -> String {
    let ctype = mime_guess::from_path(name)
        .first_raw()
        .unwrap_or("application/octet-stream");
    if [
        "text/html",
        "application/xhtml+xml",
        "text/javascript",
        "text/css",
    ]
    .contains(&ctype)
    {
        "application/octet-stream".into()
    } else {
        ctype.to_string()
    }
}

/// The fields of an upload form.
#[derive(Default, Debug)]
pub struct UploadForm {
    pub image: Option<(String, Vec<u8>)>,
    pub kind: Option<String>,
    pub subfolder: Option<String>,
    pub overwrite: Option<String>,
    pub original_ref: Option<String>,
}

/// Result of an upload: ComfyUI's JSON answer, or a bare status.
pub enum UploadOutcome {
    Saved(serde_json::Value),
    Status(StatusCode),
}

/// Where a mask upload's original comes from.
pub enum Original {
    /// Read from these directories by the form's `original_ref` (ComfyUI itself).
    InDirs,
    /// Already read by the caller (the gate, from whichever backend holds it); `None` when it
    /// does not exist.
    Bytes(Option<Vec<u8>>),
}

/// `image_upload` with ComfyUI's collision rule; `mask` composites onto `original_ref`
/// (`server.py::upload_image` and `upload_mask`).
pub fn upload(dirs: &Dirs, form: UploadForm, mask: bool) -> UploadOutcome {
    upload_with(dirs, form, mask.then_some(Original::InDirs), &|_, _| false)
}

/// [`upload`], with the original of a mask given (`mask`), and `taken(subfolder, name)` naming
/// files that exist elsewhere under this name (the gate: a backend's output shown under it),
/// which the collision rule steps over as it steps over an existing file of other content.
pub fn upload_with(
    dirs: &Dirs,
    mut form: UploadForm,
    mask: Option<Original>,
    taken: &dyn Fn(&str, &str) -> bool,
) -> UploadOutcome {
    let kind = form.kind.clone().unwrap_or_else(|| "input".to_string());
    let Some((filename, data)) = form.image.take() else {
        return match dirs.by_type(&kind) {
            Some(_) => UploadOutcome::Status(StatusCode::BAD_REQUEST),
            None => UploadOutcome::Status(StatusCode::INTERNAL_SERVER_ERROR),
        };
    };
    let subfolder = form.subfolder.clone().unwrap_or_default();
    let (folder, target) = match upload_target(dirs, &kind, &subfolder, &filename) {
        Ok(paths) => paths,
        Err(code) => return UploadOutcome::Status(code),
    };
    if std::fs::create_dir_all(&folder).is_err() {
        return UploadOutcome::Status(StatusCode::INTERNAL_SERVER_ERROR);
    }
    let overwrite = matches!(form.overwrite.as_deref(), Some("true") | Some("1"));
    let (stem, ext) = split_ext(&filename);
    let sub_key = subfolder.trim_matches('/').to_string();
    let mut name = filename.clone();
    let mut path = target;
    let mut duplicate = false;
    if !overwrite {
        let mut i = 1;
        while path.exists() || taken(&sub_key, &name) {
            if path.exists()
                && std::fs::read(&path)
                    .is_ok_and(|existing| Sha256::digest(&existing) == Sha256::digest(&data))
            {
                duplicate = true;
                break;
            }
            name = format!("{stem} ({i}){ext}");
            path = folder.join(&name);
            i += 1;
        }
    }
    if !duplicate {
        let bytes = match mask {
            Some(original) => {
                let original = match original {
                    Original::Bytes(b) => b,
                    Original::InDirs => match original_bytes(dirs, form.original_ref.as_deref()) {
                        Ok(b) => b,
                        Err(code) => return UploadOutcome::Status(code),
                    },
                };
                let Some(original) = original else {
                    return saved(&name, &subfolder, &kind);
                };
                match composite_mask(&original, &data) {
                    Ok(b) => b,
                    Err(code) => return UploadOutcome::Status(code),
                }
            }
            None => data,
        };
        if std::fs::write(&path, bytes).is_err() {
            return UploadOutcome::Status(StatusCode::INTERNAL_SERVER_ERROR);
        }
    }
    saved(&name, &subfolder, &kind)
}

/// Where an upload of `filename` into `subfolder` of the `kind` directory goes: `(folder,
/// file)`, both inside that directory (`server.py::image_save_function`: a path that leaves
/// it is a 400; an unknown type a 500; an empty file name a 400). Client bytes reach it
/// unchecked: it is a fuzz target (`fuzz/`).
pub fn upload_target(
    dirs: &Dirs,
    kind: &str,
    subfolder: &str,
    filename: &str,
) -> Result<(PathBuf, PathBuf), StatusCode> {
    let base = dirs
        .by_type(kind)
        .ok_or(StatusCode::INTERNAL_SERVER_ERROR)?;
    if filename.is_empty() {
        return Err(StatusCode::BAD_REQUEST);
    }
    let folder = normalize(&base.join(normalize(Path::new(subfolder))));
    let target = normalize(&folder.join(filename));
    if !target.starts_with(base) || !folder.starts_with(base) {
        return Err(StatusCode::BAD_REQUEST);
    }
    Ok((folder, target))
}

/// `/upload/mask`'s `original_ref` (a JSON string `{"filename", "subfolder"?, "type"?}`, type
/// `output` by default) as a reference. Errors as ComfyUI answers: 500 when absent or not JSON,
/// 400 for a bad filename or type, 403 for a subfolder outside the directory.
pub fn original_ref(raw: Option<&str>) -> Result<refs::FileRef, StatusCode> {
    let raw = raw.ok_or(StatusCode::INTERNAL_SERVER_ERROR)?;
    let v: serde_json::Value =
        serde_json::from_str(raw).map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
    let filename = v["filename"].as_str().ok_or(StatusCode::BAD_REQUEST)?;
    refs::FileRef::from_view(Some(filename), v["subfolder"].as_str(), v["type"].as_str()).map_err(
        |code| {
            if code == StatusCode::NOT_FOUND {
                StatusCode::BAD_REQUEST
            } else {
                code
            }
        },
    )
}

/// The bytes of a mask's original in `dirs`; `Ok(None)` when it does not exist.
fn original_bytes(dirs: &Dirs, raw: Option<&str>) -> Result<Option<Vec<u8>>, StatusCode> {
    let r = original_ref(raw)?;
    let path = dirs.path_of(&r).ok_or(StatusCode::BAD_REQUEST)?;
    Ok(std::fs::read(path).ok())
}

fn saved(name: &str, subfolder: &str, kind: &str) -> UploadOutcome {
    UploadOutcome::Saved(serde_json::json!({ "name": name, "subfolder": subfolder, "type": kind }))
}

fn split_ext(name: &str) -> (String, String) {
    match name.rfind('.') {
        Some(i) if i > 0 => (name[..i].to_string(), name[i..].to_string()),
        _ => (name.to_string(), String::new()),
    }
}

/// The mask upload: the original's RGB (and its PNG text chunks) with the uploaded image's
/// alpha, as a PNG.
fn composite_mask(original: &[u8], data: &[u8]) -> Result<Vec<u8>, StatusCode> {
    let (orig, _) = Image::from_png(original).map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
    let text = images::png_text_chunks(original);
    let (mask_img, mask_alpha) =
        Image::from_png(data).map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
    let alpha =
        mask_alpha.unwrap_or_else(|| vec![255; (mask_img.width * mask_img.height) as usize]);
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, orig.width, orig.height);
        enc.set_color(png::ColorType::Rgba);
        enc.set_depth(png::BitDepth::Eight);
        for (k, v) in text {
            let _ = enc.add_text_chunk(k, v);
        }
        let mut rgba = Vec::with_capacity((orig.width * orig.height * 4) as usize);
        for (i, px) in orig.rgb.chunks_exact(3).enumerate() {
            rgba.extend_from_slice(px);
            rgba.push(alpha.get(i).copied().unwrap_or(255));
        }
        let mut w = enc
            .write_header()
            .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
        w.write_image_data(&rgba)
            .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
    }
    Ok(out)
}

/// Parses a `multipart/form-data` upload body into its fields.
pub async fn parse_upload_form(content_type: &str, body: &[u8]) -> Result<UploadForm, String> {
    let boundary = multer::parse_boundary(content_type).map_err(|e| e.to_string())?;
    let data = bytes::Bytes::copy_from_slice(body);
    let stream = futures_util::stream::once(async move { Ok::<_, std::io::Error>(data) });
    let mut multipart = multer::Multipart::new(stream, boundary);
    let mut form = UploadForm::default();
    while let Some(field) = multipart.next_field().await.map_err(|e| e.to_string())? {
        let name = field.name().unwrap_or("").to_string();
        let file_name = field.file_name().map(str::to_string);
        let bytes = field.bytes().await.map_err(|e| e.to_string())?;
        let as_text = || String::from_utf8_lossy(&bytes).into_owned();
        match name.as_str() {
            "image" => {
                form.image = Some(file_name.map(|f| (f, bytes.to_vec())).unwrap_or_default())
            }
            "type" => form.kind = Some(as_text()),
            "subfolder" => form.subfolder = Some(as_text()),
            "overwrite" => form.overwrite = Some(as_text()),
            "original_ref" => form.original_ref = Some(as_text()),
            _ => {}
        }
    }
    Ok(form)
}

#[cfg(test)]
mod tests {
    #[test]
    fn normalize_keeps_every_unmatched_parent() {
        let n = |p: &str| super::normalize(std::path::Path::new(p));
        assert_eq!(n("../.."), std::path::PathBuf::from("../.."));
        assert_eq!(n("a/../../b"), std::path::PathBuf::from("../b"));
        assert_eq!(n("a/./b/../c"), std::path::PathBuf::from("a/c"));
        assert_eq!(n("/a/../.."), std::path::PathBuf::from("/"));
        assert_eq!(n("/base/in/../.."), std::path::PathBuf::from("/"));
    }

    use super::*;

    #[test]
    fn counters_follow_existing_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dirs = Dirs::create(tmp.path()).unwrap();
        let (_, stem, c, sub) = dirs.save_path(&dirs.output, "ComfyUI").unwrap();
        assert_eq!((stem.as_str(), c, sub.as_str()), ("ComfyUI", 1, ""));
        std::fs::write(dirs.output.join("ComfyUI_00007_.png"), b"x").unwrap();
        std::fs::write(dirs.output.join("Other_00099_.png"), b"x").unwrap();
        assert_eq!(dirs.save_path(&dirs.output, "ComfyUI").unwrap().2, 8);
        let (folder, _, c, sub) = dirs.save_path(&dirs.output, "runs/x").unwrap();
        assert_eq!((c, sub.as_str()), (1, "runs"));
        assert!(folder.ends_with("output/runs"));
        assert!(dirs.save_path(&dirs.output, "../escape").is_err());
    }
}
