//! The reference's input pipeline, reproduced exactly, with no tensor
//! framework so edge devices can run it:
//!
//! * decode JPEG, PNG or WebP and convert to RGB (`PIL.Image.convert("RGB")`);
//! * `Resize(256)`: the short side to 256 with Pillow's antialiased bilinear
//!   filter in 8-bit fixed point ([`resize_bilinear`]), as torchvision does
//!   for PIL images;
//! * `CenterCrop(224)`, `ToTensor`, `Normalize(ImageNet mean, std)` in `f32`.
//!
//! The output is a `3 × 224 × 224` CHW buffer ready for the encoder.
//!
//! [`ImageFolder`] lists the datasets these images come from.

pub mod folder;
mod resize;

use std::path::Path;

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use folder::ImageFolder;
pub use resize::resize_bilinear;

/// Why an image could not be read or prepared.
#[derive(Debug, Error)]
pub enum Error {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io { path: String, source: std::io::Error },
    /// The bytes are not a decodable JPEG, PNG or WebP image.
    #[error("cannot decode image{context}: {reason} (supported: JPEG, PNG, WebP)")]
    Decode { context: String, reason: String },
    /// The image is too small for the pipeline (no crop fits).
    #[error("image of {width}×{height} pixels is not usable: {why}")]
    Size { width: u32, height: u32, why: String },
    /// The image, or what the pipeline would make of it, exceeds a limit.
    #[error("image of {width}×{height} pixels is over the limit: {why}")]
    TooLarge { width: u32, height: u32, why: String },
    /// An ImageFolder directory could not be listed or holds no images.
    #[error("{0}")]
    Folder(String),
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An 8-bit RGB image, row-major, 3 bytes per pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    /// Columns.
    pub width: u32,
    /// Rows.
    pub height: u32,
    /// `width · height · 3` bytes.
    pub pixels: Vec<u8>,
}

/// Decodes a JPEG with libjpeg-turbo's decoder (mozjpeg's, its defaults:
/// accurate integer IDCT, fancy upsampling), the library Pillow uses, so
/// that JPEG inputs give the reference's pixels exactly. `None` for what it
/// does not convert to RGB itself (CMYK/YCCK), which the generic decoder takes.
fn decode_jpeg(bytes: &[u8], max_pixels: u64) -> Option<Result<RgbImage>> {
    let decode_error = |reason: String| Error::Decode {
        context: String::new(),
        reason,
    };
    // libjpeg reports errors by unwinding out of its error handler.
    let outcome = std::panic::catch_unwind(|| -> Option<Result<RgbImage>> {
        let decompress = match mozjpeg::Decompress::with_err(strict_jpeg_errors()).from_mem(bytes) {
            Ok(d) => d,
            Err(e) => return Some(Err(decode_error(e.to_string()))),
        };
        if !matches!(
            decompress.color_space(),
            mozjpeg::ColorSpace::JCS_GRAYSCALE | mozjpeg::ColorSpace::JCS_YCbCr | mozjpeg::ColorSpace::JCS_RGB
        ) {
            return None;
        }
        let (width, height) = (decompress.width() as u32, decompress.height() as u32);
        if u64::from(width) * u64::from(height) > max_pixels {
            return Some(Err(Error::TooLarge {
                width,
                height,
                why: format!("more than {max_pixels} pixels"),
            }));
        }
        let decoded = (|| -> std::io::Result<Vec<u8>> {
            let mut started = decompress.rgb()?;
            let pixels: Vec<u8> = started.read_scanlines()?;
            started.finish()?;
            Ok(pixels)
        })();
        Some(match decoded {
            Ok(pixels) if pixels.len() == width as usize * height as usize * 3 => {
                Ok(RgbImage { width, height, pixels })
            }
            Ok(_) => Err(decode_error("the JPEG data ends early".into())),
            Err(e) => Err(decode_error(e.to_string())),
        })
    });
    outcome.unwrap_or_else(|_| Some(Err(decode_error("corrupt JPEG data".into()))))
}

/// libjpeg's standard error manager, with errors unwinding (caught in
/// [`decode_jpeg`]) and data that ends early treated as an error, as Pillow
/// does ("image file is truncated"); libjpeg itself only warns and fills the
/// rest with grey. Other warnings (e.g. extraneous bytes) stay warnings, as in Pillow.
fn strict_jpeg_errors() -> mozjpeg_sys::jpeg_error_mgr {
    extern "C-unwind" fn error_exit(_cinfo: &mut mozjpeg_sys::jpeg_common_struct) {
        std::panic::resume_unwind(Box::new("libjpeg error"));
    }
    extern "C-unwind" fn emit_message(cinfo: &mut mozjpeg_sys::jpeg_common_struct, level: std::os::raw::c_int) {
        // SAFETY: libjpeg calls this with the struct whose `err` it was given: ours.
        let code = unsafe { cinfo.err.as_ref() }.map(|e| e.msg_code);
        if level < 0 && code == Some(mozjpeg_sys::JWRN_JPEG_EOF as std::os::raw::c_int) {
            std::panic::resume_unwind(Box::new("JPEG data ends early"));
        }
    }
    // SAFETY: jpeg_std_error initialises every field of the zeroed struct.
    let mut err: mozjpeg_sys::jpeg_error_mgr = unsafe { std::mem::zeroed() };
    unsafe { mozjpeg_sys::jpeg_std_error(&mut err) };
    err.error_exit = Some(error_exit);
    err.emit_message = Some(emit_message);
    err
}

/// Largest decoded image accepted (pixels), to bound memory on hostile input.
pub const MAX_PIXELS: u64 = 1 << 28;

impl RgbImage {
    /// Decodes JPEG, PNG or WebP bytes and converts them to RGB (alpha dropped,
    /// grey and palette images expanded), like `PIL.Image.open(…).convert("RGB")`.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        Self::decode_limited(bytes, MAX_PIXELS)
    }

    /// [`RgbImage::decode`] refusing images of more than `max_pixels` pixels
    /// before decoding them, for servers that bound memory per request.
    pub fn decode_limited(bytes: &[u8], max_pixels: u64) -> Result<Self> {
        let decode_error = |reason: String| Error::Decode {
            context: String::new(),
            reason,
        };
        if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
            if let Some(decoded) = decode_jpeg(bytes, max_pixels.min(MAX_PIXELS)) {
                return decoded;
            }
        }
        let reader = || {
            image::ImageReader::new(std::io::Cursor::new(bytes))
                .with_guessed_format()
                .map_err(|e| decode_error(e.to_string()))
        };
        let (width, height) = reader()?.into_dimensions().map_err(|e| decode_error(e.to_string()))?;
        if u64::from(width) * u64::from(height) > max_pixels.min(MAX_PIXELS) {
            return Err(Error::TooLarge {
                width,
                height,
                why: format!("more than {} pixels", max_pixels.min(MAX_PIXELS)),
            });
        }
        let mut reader = reader()?;
        let mut limits = image::Limits::default();
        limits.max_alloc = Some(max_pixels.min(MAX_PIXELS) * 8);
        reader.limits(limits);
        let decoded = reader.decode().map_err(|e| decode_error(e.to_string()))?;
        let rgb = decoded.to_rgb8();
        Ok(Self {
            width: rgb.width(),
            height: rgb.height(),
            pixels: rgb.into_raw(),
        })
    }

    /// The `(width, height)` an encoded image declares in its header, read
    /// without decoding its pixels.
    pub fn dimensions(bytes: &[u8]) -> Result<(u32, u32)> {
        image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| e.to_string())
            .and_then(|r| r.into_dimensions().map_err(|e| e.to_string()))
            .map_err(|reason| Error::Decode {
                context: String::new(),
                reason,
            })
    }

    /// Reads and decodes an image file.
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::decode(&bytes).map_err(|e| match e {
            Error::Decode { reason, .. } => Error::Decode {
                context: format!(" {}", path.display()),
                reason,
            },
            other => other,
        })
    }

    /// The `width × height` window at `(left, top)`.
    pub fn crop(&self, left: u32, top: u32, width: u32, height: u32) -> Self {
        let mut pixels = Vec::with_capacity(width as usize * height as usize * 3);
        for y in top..top + height {
            let start = (y as usize * self.width as usize + left as usize) * 3;
            pixels.extend_from_slice(&self.pixels[start..start + width as usize * 3]);
        }
        Self { width, height, pixels }
    }
}

/// What [`Preprocess::plan`] found an input will cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// `(width, height)` after `Resize`.
    pub resized: (u32, u32),
    /// Bytes the pipeline holds at its peak, the decoded image included (an
    /// upper bound): what a server accounts for before decoding.
    pub working_bytes: u64,
}

/// The evaluation transform of the reference: short side to `resize`, centre
/// crop `crop`, scale to [0, 1], normalise with `mean` / `std`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preprocess {
    /// Short side after resizing (256).
    pub resize: u32,
    /// Side of the centre crop (224).
    pub crop: u32,
    /// Per-channel mean (ImageNet's).
    pub mean: [f32; 3],
    /// Per-channel standard deviation (ImageNet's).
    pub std: [f32; 3],
}

impl Default for Preprocess {
    fn default() -> Self {
        Self {
            resize: 256,
            crop: 224,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        }
    }
}

impl Preprocess {
    /// The ImageNet evaluation transform for a `size × size` network input:
    /// resize the short side to `size / 0.875` (256 for 224), crop `size`.
    pub fn for_input(size: u32) -> Self {
        Self {
            resize: (f64::from(size) / 0.875) as u32,
            crop: size,
            ..Self::default()
        }
    }

    /// `Resize(resize)` (short side, aspect kept, Pillow bilinear) then
    /// `CenterCrop(crop)`, as torchvision computes the sizes and offsets.
    pub fn resize_and_crop(&self, image: &RgbImage) -> Result<RgbImage> {
        let resized = self.resize_short_side(image)?;
        // torchvision: int(round((size - crop) / 2)), Python rounding (half to even).
        let offset = |size: u32| ((f64::from(size - self.crop)) / 2.0).round_ties_even() as u32;
        Ok(resized.crop(offset(resized.width), offset(resized.height), self.crop, self.crop))
    }

    /// What the pipeline will allocate for a `width × height` input, computed
    /// before anything is: the resized size and the bytes held at the peak.
    /// Errors when the image cannot give a `crop × crop` window, or when the
    /// decoded image, the horizontal pass's rows or the resized image would
    /// exceed `max_pixels` (a 1 × 16,777,215 PNG is 65 KB but resizes to
    /// 256 × 4,294,967,040 pixels). No arithmetic here can overflow.
    pub fn plan(&self, width: u32, height: u32, max_pixels: u64) -> Result<Plan> {
        let refuse = |why: String| Error::Size { width, height, why };
        let over = |why: String| Error::TooLarge { width, height, why };
        if width == 0 || height == 0 {
            return Err(refuse("an image needs at least one pixel".into()));
        }
        let (w, h) = (u64::from(width), u64::from(height));
        if w * h > max_pixels {
            return Err(over(format!("more than {max_pixels} pixels")));
        }
        let (short, long) = if w <= h { (w, h) } else { (h, w) };
        // torchvision: the long side is int(size · long / short), truncated.
        let new_long = u64::from(self.resize) * long / short;
        let (new_w, new_h) = if w <= h {
            (u64::from(self.resize), new_long)
        } else {
            (new_long, u64::from(self.resize))
        };
        let crop = u64::from(self.crop);
        if new_w < crop || new_h < crop {
            return Err(refuse(format!(
                "resized to {new_w}×{new_h}, smaller than the {} crop",
                self.crop
            )));
        }
        // Each factor is below 2^41 (256 · 2^32 at most), so no product overflows.
        let resized = new_w.saturating_mul(new_h);
        // The horizontal pass keeps at most every input row at the new width.
        let rows = if new_w != w { h.saturating_mul(new_w) } else { 0 };
        if resized > max_pixels || rows > max_pixels || new_w.max(new_h) > u64::from(u32::MAX) {
            return Err(over(format!(
                "resizing the short side to {} makes {new_w}×{new_h} pixels, more than {max_pixels}",
                self.resize
            )));
        }
        // Fixed-point filter taps: at most 2 per input and 3 per output pixel of each axis.
        let taps = 4 * (2 * (w + h) + 3 * (new_w + new_h));
        let pixels = (w * h)
            .saturating_add(rows)
            .saturating_add(resized)
            .saturating_add(crop * crop);
        let working_bytes = pixels
            .saturating_mul(3)
            .saturating_add(12 * crop * crop)
            .saturating_add(taps);
        Ok(Plan {
            resized: (new_w as u32, new_h as u32),
            working_bytes,
        })
    }

    /// `Resize(resize)` alone (short side, aspect kept, Pillow bilinear);
    /// errors when the result could not hold a `crop × crop` window or when
    /// any image the resize makes would exceed [`MAX_PIXELS`].
    pub fn resize_short_side(&self, image: &RgbImage) -> Result<RgbImage> {
        let plan = self.plan(image.width, image.height, MAX_PIXELS)?;
        let (new_w, new_h) = plan.resized;
        Ok(if (new_w, new_h) == (image.width, image.height) {
            image.clone()
        } else {
            resize_bilinear(image, new_w, new_h)
        })
    }

    /// Decodes `bytes` and runs the whole pipeline, refusing (before
    /// decoding) any image for which the decoded image or anything the
    /// pipeline makes of it would exceed `max_pixels`: what a server calls on
    /// uploads.
    pub fn decode_and_apply(&self, bytes: &[u8], max_pixels: u64) -> Result<Vec<f32>> {
        let (width, height) = RgbImage::dimensions(bytes)?;
        self.plan(width, height, max_pixels)?;
        let image = RgbImage::decode_limited(bytes, max_pixels)?;
        // Decoders keep to their headers, but the bound must not depend on it.
        self.plan(image.width, image.height, max_pixels)?;
        self.apply(&image)
    }

    /// `ToTensor` and `Normalize` of an already cropped image: CHW `f32`.
    pub fn normalize(&self, image: &RgbImage) -> Vec<f32> {
        let plane = image.width as usize * image.height as usize;
        let mut out = vec![0f32; 3 * plane];
        for (i, px) in image.pixels.chunks_exact(3).enumerate() {
            for c in 0..3 {
                out[c * plane + i] = (f32::from(px[c]) / 255.0 - self.mean[c]) / self.std[c];
            }
        }
        out
    }

    /// The whole pipeline: a `3 × crop × crop` CHW buffer.
    pub fn apply(&self, image: &RgbImage) -> Result<Vec<f32>> {
        Ok(self.normalize(&self.resize_and_crop(image)?))
    }
}
