//! `POST /upload/image` and `/upload/mask`: the `multipart/form-data` body (multer), the
//! form's `type` / `subfolder` / file name / `original_ref`, and where the file would be
//! written. The input is `boundary\nbody`. Nothing may panic, and every accepted target must
//! stay inside its type's directory.
#![no_main]

use std::sync::LazyLock;

use comfy_wire::files::{Dirs, normalize, original_ref, parse_upload_form, upload_target};
use libfuzzer_sys::fuzz_target;

static DIRS: LazyLock<(tempfile::TempDir, Dirs)> = LazyLock::new(|| {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dirs = Dirs::create(tmp.path()).expect("the ComfyUI directories");
    (tmp, dirs)
});

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    let boundary = String::from_utf8_lossy(&data[..split]);
    let body = data.get(split + 1..).unwrap_or(&[]);
    let content_type = format!("multipart/form-data; boundary={boundary}");
    let parsed = futures_util::FutureExt::now_or_never(parse_upload_form(&content_type, body));
    let Some(Ok(form)) = parsed else { return };
    let dirs = &DIRS.1;
    let kind = form.kind.clone().unwrap_or_else(|| "input".to_string());
    let subfolder = form.subfolder.clone().unwrap_or_default();
    if let Some((name, _)) = &form.image
        && let Ok((folder, target)) = upload_target(dirs, &kind, &subfolder, name)
    {
        let base = normalize(dirs.by_type(&kind).unwrap());
        assert!(
            folder.starts_with(&base) && target.starts_with(&base),
            "{target:?}"
        );
    }
    let _ = original_ref(form.original_ref.as_deref());
});
