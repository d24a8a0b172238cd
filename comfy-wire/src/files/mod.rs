//! ComfyUI's file rules, shared by comfy-sim and the gate: the `input/`, `output/` and `temp/`
//! layout, the save-path counter, `/view` with its path checks, and `/upload/image|mask` with its
//! collision rules. The gate keeps uploads by the same rules, so a client sees one ComfyUI.

pub mod images;

use std::path::{Component, Path, PathBuf};

use http::{Response, StatusCode, header};
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

    /// `annotated_filepath`: strips a ` [output]`/` [input]`/` [temp]` suffix.
    pub fn annotated<'a>(&self, name: &'a str) -> (&'a str, Option<&Path>) {
        for (suffix, kind) in [
            ("[output]", "output"),
            ("[input]", "input"),
            ("[temp]", "temp"),
        ] {
            if name.ends_with(suffix) {
                let cut = name.len().saturating_sub(suffix.len() + 1);
                return (&name[..cut], self.by_type(kind));
            }
        }
        (name, None)
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
pub fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// `GET /view` (reference §4.11).
pub fn view(dirs: &Dirs, query: &[(String, String)]) -> Response<Body> {
    let get = |k: &str| query.iter().find(|(q, _)| q == k).map(|(_, v)| v.as_str());
    let Some(raw_name) = get("filename") else {
        return status(StatusCode::NOT_FOUND);
    };
    let (name, annotated_dir) = dirs.annotated(raw_name);
    if name.is_empty() {
        return status(StatusCode::BAD_REQUEST);
    }
    if name.starts_with('/') || name.contains("..") {
        return status(StatusCode::BAD_REQUEST);
    }
    let base = match annotated_dir {
        Some(d) => d.to_path_buf(),
        None => match dirs.by_type(get("type").unwrap_or("output")) {
            Some(d) => d.to_path_buf(),
            None => return status(StatusCode::BAD_REQUEST),
        },
    };
    let mut dir = base.clone();
    if let Some(sub) = get("subfolder") {
        let joined = normalize(&base.join(sub));
        if !joined.starts_with(&base) {
            return status(StatusCode::FORBIDDEN);
        }
        dir = joined;
    }
    let basename = Path::new(name)
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let file = dir.join(&basename);
    if !file.is_file() {
        return status(StatusCode::NOT_FOUND);
    }
    let Ok(bytes) = std::fs::read(&file) else {
        return status(StatusCode::NOT_FOUND);
    };
    let disposition = format!("filename=\"{basename}\"");
    let respond = |body: Vec<u8>, ctype: &str| {
        let mut resp = Response::new(full(body));
        let h = resp.headers_mut();
        if let Ok(v) = ctype.parse() {
            h.insert(header::CONTENT_TYPE, v);
        }
        if let Ok(v) = disposition.parse() {
            h.insert(header::CONTENT_DISPOSITION, v);
        }
        resp
    };
    let channel = get("channel").unwrap_or("rgba");
    if get("preview").is_some() || channel == "rgb" || channel == "a" {
        let Ok((img, alpha)) = Image::from_png(&bytes) else {
            return crate::http::text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "500 Internal Server Error\n\nServer got itself in trouble",
            );
        };
        if get("preview").is_some() {
            return respond(img.to_jpeg(), "image/jpeg");
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
    let mut ctype = mime_guess::from_path(&basename)
        .first_raw()
        .unwrap_or("application/octet-stream")
        .to_string();
    if [
        "text/html",
        "application/xhtml+xml",
        "text/javascript",
        "text/css",
    ]
    .contains(&ctype.as_str())
    {
        ctype = "application/octet-stream".into();
    }
    respond(bytes, &ctype)
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

/// `image_upload` with ComfyUI's collision rule; `mask` composites onto `original_ref`.
pub fn upload(dirs: &Dirs, form: UploadForm, mask: bool) -> UploadOutcome {
    let kind = form.kind.clone().unwrap_or_else(|| "input".to_string());
    let Some(base) = dirs.by_type(&kind).map(Path::to_path_buf) else {
        return UploadOutcome::Status(StatusCode::INTERNAL_SERVER_ERROR);
    };
    let Some((filename, data)) = form.image else {
        return UploadOutcome::Status(StatusCode::BAD_REQUEST);
    };
    if filename.is_empty() {
        return UploadOutcome::Status(StatusCode::BAD_REQUEST);
    }
    let subfolder = form.subfolder.clone().unwrap_or_default();
    let folder = normalize(&base.join(normalize(Path::new(&subfolder))));
    let target = normalize(&folder.join(&filename));
    if !target.starts_with(&base) || !folder.starts_with(&base) {
        return UploadOutcome::Status(StatusCode::BAD_REQUEST);
    }
    if std::fs::create_dir_all(&folder).is_err() {
        return UploadOutcome::Status(StatusCode::INTERNAL_SERVER_ERROR);
    }
    let overwrite = matches!(form.overwrite.as_deref(), Some("true") | Some("1"));
    let (stem, ext) = split_ext(&filename);
    let mut name = filename.clone();
    let mut path = target;
    let mut duplicate = false;
    if !overwrite {
        let mut i = 1;
        while path.exists() {
            if std::fs::read(&path)
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
        let bytes = if mask {
            match composite_mask(dirs, form.original_ref.as_deref(), &data) {
                Ok(Some(b)) => b,
                Ok(None) => return saved(&name, &subfolder, &kind),
                Err(code) => return UploadOutcome::Status(code),
            }
        } else {
            data
        };
        if std::fs::write(&path, bytes).is_err() {
            return UploadOutcome::Status(StatusCode::INTERNAL_SERVER_ERROR);
        }
    }
    saved(&name, &subfolder, &kind)
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

/// The mask upload: the original's RGB with the uploaded image's alpha. `Ok(None)` when the
/// original does not exist (ComfyUI then writes nothing but still answers 200).
fn composite_mask(
    dirs: &Dirs,
    original_ref: Option<&str>,
    data: &[u8],
) -> Result<Option<Vec<u8>>, StatusCode> {
    let Some(raw) = original_ref else {
        return Err(StatusCode::INTERNAL_SERVER_ERROR);
    };
    let reference: serde_json::Value =
        serde_json::from_str(raw).map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
    let fname = reference["filename"].as_str().unwrap_or("");
    let (fname, annotated_dir) = dirs.annotated(fname);
    if fname.is_empty() || fname.starts_with('/') || fname.contains("..") {
        return Err(StatusCode::BAD_REQUEST);
    }
    let mut dir = match annotated_dir {
        Some(d) => d.to_path_buf(),
        None => dirs
            .by_type(reference["type"].as_str().unwrap_or("output"))
            .ok_or(StatusCode::BAD_REQUEST)?
            .to_path_buf(),
    };
    if let Some(sub) = reference["subfolder"].as_str().filter(|s| !s.is_empty()) {
        let joined = normalize(&dir.join(sub));
        if !joined.starts_with(&dir) {
            return Err(StatusCode::FORBIDDEN);
        }
        dir = joined;
    }
    let original = match std::fs::read(dir.join(fname)) {
        Ok(b) => b,
        Err(_) => return Ok(None),
    };
    let (orig, _) = Image::from_png(&original).map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
    let text = images::png_text_chunks(&original);
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
    Ok(Some(out))
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
