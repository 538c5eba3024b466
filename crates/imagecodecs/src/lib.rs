//! The image codecs FrankenSplit is measured against: what "offload the
//! image" costs in bytes. JPEG is libjpeg-turbo's encoder with its v6
//! defaults, driven as Pillow's `save(…, "JPEG", quality=q)` drives it
//! (baseline, Huffman tables from the standard, 4:2:0 chroma; the bytes
//! equal Pillow's, `tests/pillow_jpeg.rs`),
//! WebP is libwebp 1.6's lossy encoder driven as Pillow's
//! `save(…, "WEBP", quality=q)` drives it (default configuration, method 4,
//! the pixels imported as ARGB; the bytes equal Pillow 12's,
//! `tests/pillow_webp.rs`), PNG is lossless.
//!
//! Decoding goes through [`RgbImage::decode`], as the server does.

use std::fmt;
use std::str::FromStr;

use frankensplit_preprocess::RgbImage;
use image::ImageEncoder;
use serde::{Deserialize, Serialize};

/// Why an image could not be encoded or a codec name not parsed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The codec description is not understood.
    #[error("unknown image codec {0:?}: expected jpeg[:q=1..100], webp[:q=0..100] or png")]
    Spec(String),
    /// The encoder failed.
    #[error("{codec} encoding failed: {reason}")]
    Encode {
        /// The codec.
        codec: &'static str,
        /// The library's message.
        reason: String,
    },
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An image codec and its setting.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "codec", rename_all = "lowercase")]
pub enum ImageCodec {
    /// Baseline JPEG, 4:2:0, standard Huffman tables (libjpeg-turbo).
    Jpeg {
        /// IJG quality 1–100 (Pillow's default: 75).
        quality: u8,
    },
    /// Lossy WebP (libwebp).
    Webp {
        /// libwebp quality 0–100 (Pillow's default: 80).
        quality: f32,
    },
    /// Lossless PNG (default compression).
    Png,
}

impl ImageCodec {
    /// Short name: `jpeg`, `webp`, `png`.
    pub fn family(&self) -> &'static str {
        match self {
            Self::Jpeg { .. } => "jpeg",
            Self::Webp { .. } => "webp",
            Self::Png => "png",
        }
    }

    /// Parses a list of codec specs as a command line gives them; empty
    /// entries are skipped, so `--codec ''` means none.
    pub fn parse_list(specs: &[String]) -> Result<Vec<Self>> {
        specs
            .iter()
            .filter(|spec| !spec.trim().is_empty())
            .map(|spec| spec.parse())
            .collect()
    }

    /// Compresses an RGB image.
    pub fn encode(&self, image: &RgbImage) -> Result<Vec<u8>> {
        match *self {
            Self::Jpeg { quality } => encode_jpeg(image, quality),
            Self::Webp { quality } => encode_webp(image, quality),
            Self::Png => encode_png(image),
        }
    }
}

impl fmt::Display for ImageCodec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Jpeg { quality } => write!(f, "jpeg:q={quality}"),
            Self::Webp { quality } => write!(f, "webp:q={quality}"),
            Self::Png => f.write_str("png"),
        }
    }
}

impl FromStr for ImageCodec {
    type Err = Error;

    /// `jpeg`, `jpeg:q=90`, `webp`, `webp:q=50`, `png`; quality defaults are Pillow's.
    fn from_str(spec: &str) -> Result<Self> {
        let bad = || Error::Spec(spec.to_string());
        let (family, setting) = match spec.trim().split_once(':') {
            Some((family, setting)) => (family, Some(setting)),
            None => (spec.trim(), None),
        };
        let quality = |default: f32, max: f32| -> Result<f32> {
            match setting {
                None => Ok(default),
                Some(s) => {
                    let q: f32 = s
                        .strip_prefix("q=")
                        .or_else(|| s.strip_prefix("quality="))
                        .ok_or_else(bad)?
                        .parse()
                        .map_err(|_| bad())?;
                    if (0.0..=max).contains(&q) {
                        Ok(q)
                    } else {
                        Err(bad())
                    }
                }
            }
        };
        match family.to_ascii_lowercase().as_str() {
            "jpeg" | "jpg" => {
                let q = quality(75.0, 100.0)?;
                if q < 1.0 || q.fract() != 0.0 {
                    return Err(bad());
                }
                Ok(Self::Jpeg { quality: q as u8 })
            }
            "webp" => Ok(Self::Webp {
                quality: quality(80.0, 100.0)?,
            }),
            "png" if setting.is_none() => Ok(Self::Png),
            _ => Err(bad()),
        }
    }
}

fn check_size(image: &RgbImage) -> Result<(), String> {
    if image.width == 0 || image.height == 0 {
        return Err("empty image".into());
    }
    if image.pixels.len() != image.width as usize * image.height as usize * 3 {
        return Err("pixel buffer does not match the image size".into());
    }
    Ok(())
}

fn encode_jpeg(image: &RgbImage, quality: u8) -> Result<Vec<u8>> {
    let fail = |reason: String| Error::Encode { codec: "jpeg", reason };
    check_size(image).map_err(fail)?;
    if image.width > 65_500 || image.height > 65_500 {
        return Err(fail("JPEG images are at most 65,500 pixels on a side".into()));
    }
    libjpeg::compress(image, quality).map_err(fail)
}

/// libjpeg-turbo's compressor driven as Pillow drives it: `jpeg_set_defaults`
/// (libjpeg v6 profile: baseline, Annex K tables, standard Huffman tables,
/// 4:2:0), `jpeg_set_quality(q, force_baseline = TRUE)` (tables clamped to
/// 8 bits, which the `mozjpeg` crate's wrapper does not do), one pass.
mod libjpeg {
    use std::os::raw::{c_int, c_ulong};

    use frankensplit_preprocess::RgbImage;
    use mozjpeg_sys as ffi;

    extern "C-unwind" fn error_exit(_cinfo: &mut ffi::jpeg_common_struct) {
        std::panic::resume_unwind(Box::new("libjpeg error"));
    }

    /// Frees libjpeg's state and its output buffer however compression ends.
    struct Session {
        cinfo: Box<ffi::jpeg_compress_struct>,
        _err: Box<ffi::jpeg_error_mgr>,
        buffer: Box<(*mut u8, c_ulong)>,
    }

    impl Drop for Session {
        fn drop(&mut self) {
            // SAFETY: the struct was created by jpeg_CreateCompress and the
            // buffer, if any, was allocated by libjpeg's memory destination.
            unsafe {
                ffi::jpeg_destroy_compress(&mut self.cinfo);
                if !self.buffer.0.is_null() {
                    libc::free(self.buffer.0.cast());
                }
            }
        }
    }

    pub fn compress(image: &RgbImage, quality: u8) -> Result<Vec<u8>, String> {
        // SAFETY: the zeroed structs are initialised by jpeg_std_error and
        // jpeg_CreateCompress before use; they are boxed so that the
        // pointers libjpeg keeps stay valid; rows point into `image`, which
        // outlives the session; errors unwind out of libjpeg (C-unwind) and
        // are caught here, and the session is dropped on both paths.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe {
            let mut err: Box<ffi::jpeg_error_mgr> = Box::new(std::mem::zeroed());
            ffi::jpeg_std_error(&mut err);
            err.error_exit = Some(error_exit);
            let mut cinfo: Box<ffi::jpeg_compress_struct> = Box::new(std::mem::zeroed());
            cinfo.common.err = &mut *err;
            ffi::jpeg_CreateCompress(
                &mut *cinfo,
                ffi::JPEG_LIB_VERSION,
                std::mem::size_of::<ffi::jpeg_compress_struct>(),
            );
            let mut session = Session {
                cinfo,
                _err: err,
                buffer: Box::new((std::ptr::null_mut(), 0)),
            };
            let buffer = &mut *session.buffer;
            ffi::jpeg_mem_dest(&mut session.cinfo, &mut buffer.0, &mut buffer.1);
            let cinfo = &mut *session.cinfo;
            cinfo.image_width = image.width;
            cinfo.image_height = image.height;
            cinfo.input_components = 3;
            cinfo.in_color_space = ffi::J_COLOR_SPACE::JCS_RGB;
            ffi::jpeg_c_set_int_param(
                cinfo,
                ffi::J_INT_PARAM::JINT_COMPRESS_PROFILE,
                ffi::JINT_COMPRESS_PROFILE_VALUE::JCP_FASTEST as c_int,
            );
            ffi::jpeg_set_defaults(cinfo);
            ffi::jpeg_set_quality(cinfo, c_int::from(quality), 1);
            ffi::jpeg_start_compress(cinfo, 1);
            let row = image.width as usize * 3;
            while cinfo.next_scanline < cinfo.image_height {
                let line = image.pixels[cinfo.next_scanline as usize * row..].as_ptr();
                ffi::jpeg_write_scanlines(cinfo, &line, 1);
            }
            ffi::jpeg_finish_compress(cinfo);
            let (data, len) = *session.buffer;
            std::slice::from_raw_parts(data, len as usize).to_vec()
        }));
        outcome.map_err(|_| "libjpeg could not compress the image".to_string())
    }
}

fn encode_webp(image: &RgbImage, quality: f32) -> Result<Vec<u8>> {
    let fail = |reason: String| Error::Encode { codec: "webp", reason };
    check_size(image).map_err(fail)?;
    if image.width > 16_383 || image.height > 16_383 {
        return Err(fail("WebP images are at most 16,383 pixels on a side".into()));
    }
    libwebp::encode(image, quality).map_err(fail)
}

/// libwebp's lossy encoder driven as Pillow 12's `WebPEncode` drives it for
/// `save(format="WEBP", quality=q)`: `WebPConfigInit` (the default preset),
/// then quality `q`, alpha quality 100, method 4, not exact; the pixels
/// imported as opaque ARGB (`use_argb`), which libwebp converts to YUV 4:2:0
/// inside `WebPEncode`. Pillow then passes the bitstream through WebPMux,
/// which for an opaque image without metadata writes the same RIFF file
/// back, so that step is left out (`tests/pillow_webp.rs` holds the bytes
/// equal).
mod libwebp {
    use std::os::raw::c_int;

    use frankensplit_preprocess::RgbImage;
    use libwebp_sys as ffi;

    /// Frees the picture and the output buffer however encoding ends.
    struct Session {
        picture: ffi::WebPPicture,
        writer: ffi::WebPMemoryWriter,
    }

    impl Drop for Session {
        fn drop(&mut self) {
            // SAFETY: both were initialised by libwebp (WebPPictureInit,
            // WebPMemoryWriterInit) and free only what libwebp allocated.
            unsafe {
                ffi::WebPPictureFree(&mut self.picture);
                ffi::WebPMemoryWriterClear(&mut self.writer);
            }
        }
    }

    pub fn encode(image: &RgbImage, quality: f32) -> Result<Vec<u8>, String> {
        // SAFETY: the config and picture are initialised by libwebp before
        // use; the ARGB buffer libwebp allocates holds `argb_stride × height`
        // words, of which each row's first `width` are written; the writer's
        // pointer stays valid because the session is boxed and outlives
        // WebPEncode.
        unsafe {
            let mut config: ffi::WebPConfig = std::mem::zeroed();
            if ffi::WebPConfigInitInternal(
                &mut config,
                ffi::WebPPreset::WEBP_PRESET_DEFAULT,
                75.0,
                ffi::WEBP_ENCODER_ABI_VERSION as c_int,
            ) == 0
            {
                return Err("libwebp's version does not match its headers".into());
            }
            config.lossless = 0;
            config.quality = quality;
            config.alpha_quality = 100;
            config.method = 4;
            config.exact = 0;
            if ffi::WebPValidateConfig(&config) == 0 {
                return Err(format!("invalid configuration (quality {quality})"));
            }
            let mut session = Box::new(Session {
                picture: std::mem::zeroed(),
                writer: std::mem::zeroed(),
            });
            if ffi::WebPPictureInitInternal(&mut session.picture, ffi::WEBP_ENCODER_ABI_VERSION as c_int) == 0 {
                return Err("libwebp's version does not match its headers".into());
            }
            ffi::WebPMemoryWriterInit(&mut session.writer);
            let picture = &mut session.picture;
            picture.width = image.width as c_int;
            picture.height = image.height as c_int;
            picture.use_argb = 1;
            if ffi::WebPPictureAlloc(picture) == 0 {
                return Err("could not allocate the picture".into());
            }
            let (width, stride) = (image.width as usize, picture.argb_stride as usize);
            for (y, row) in image.pixels.chunks_exact(width * 3).enumerate() {
                let out = std::slice::from_raw_parts_mut(picture.argb.add(y * stride), width);
                for (dst, rgb) in out.iter_mut().zip(row.chunks_exact(3)) {
                    *dst = 0xff00_0000 | u32::from(rgb[0]) << 16 | u32::from(rgb[1]) << 8 | u32::from(rgb[2]);
                }
            }
            picture.writer = Some(ffi::WebPMemoryWrite);
            picture.custom_ptr = std::ptr::addr_of_mut!(session.writer).cast();
            if ffi::WebPEncode(&config, &mut session.picture) == 0 {
                return Err(format!("libwebp error {:?}", session.picture.error_code));
            }
            Ok(std::slice::from_raw_parts(session.writer.mem, session.writer.size).to_vec())
        }
    }
}

fn encode_png(image: &RgbImage) -> Result<Vec<u8>> {
    let fail = |reason: String| Error::Encode { codec: "png", reason };
    check_size(image).map_err(fail)?;
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(&image.pixels, image.width, image.height, image::ExtendedColorType::Rgb8)
        .map_err(|e| fail(e.to_string()))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A smooth gradient with a sharp-edged square: compressible, but not trivially.
    fn picture(width: u32, height: u32) -> RgbImage {
        let mut pixels = Vec::with_capacity((width * height * 3) as usize);
        for y in 0..height {
            for x in 0..width {
                let inside = (width / 4..3 * width / 4).contains(&x) && (height / 4..3 * height / 4).contains(&y);
                pixels.extend_from_slice(&[
                    (x * 255 / width) as u8,
                    (y * 255 / height) as u8,
                    if inside { 230 } else { 20 },
                ]);
            }
        }
        RgbImage { width, height, pixels }
    }

    fn mean_abs_error(a: &RgbImage, b: &RgbImage) -> f64 {
        let total: u64 = a
            .pixels
            .iter()
            .zip(&b.pixels)
            .map(|(&x, &y)| u64::from(x.abs_diff(y)))
            .sum();
        total as f64 / a.pixels.len() as f64
    }

    #[test]
    fn every_codec_round_trips_through_the_servers_decoder() {
        let original = picture(97, 64);
        for codec in ["png", "jpeg:q=90", "webp:q=90"] {
            let codec: ImageCodec = codec.parse().unwrap();
            let bytes = codec.encode(&original).unwrap();
            let decoded = RgbImage::decode(&bytes).unwrap();
            assert_eq!((decoded.width, decoded.height), (97, 64), "{codec}");
            let error = mean_abs_error(&original, &decoded);
            match codec {
                ImageCodec::Png => assert_eq!(decoded, original),
                _ => assert!(error < 6.0, "{codec}: mean error {error}"),
            }
        }
    }

    #[test]
    fn lower_quality_means_fewer_bytes_and_more_error() {
        let original = picture(128, 128);
        for family in ["jpeg", "webp"] {
            let low: ImageCodec = format!("{family}:q=10").parse().unwrap();
            let high: ImageCodec = format!("{family}:q=95").parse().unwrap();
            let (low_bytes, high_bytes) = (low.encode(&original).unwrap(), high.encode(&original).unwrap());
            assert!(low_bytes.len() < high_bytes.len(), "{family}");
            let low_error = mean_abs_error(&original, &RgbImage::decode(&low_bytes).unwrap());
            let high_error = mean_abs_error(&original, &RgbImage::decode(&high_bytes).unwrap());
            assert!(low_error > high_error, "{family}: {low_error} vs {high_error}");
        }
    }

    #[test]
    fn jpeg_is_baseline_with_standard_tables_and_420_chroma() {
        let bytes = ImageCodec::Jpeg { quality: 75 }.encode(&picture(64, 48)).unwrap();
        let markers: Vec<u8> = bytes
            .windows(2)
            .filter(|w| w[0] == 0xFF && (0xC0..=0xCF).contains(&w[1]))
            .map(|w| w[1])
            .collect();
        // SOF0 (baseline), never SOF2 (progressive).
        assert!(markers.contains(&0xC0) && !markers.contains(&0xC2), "{markers:x?}");
        let sof = bytes.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        // Component 1 (luma) sampled 2×2, the chroma components 1×1.
        assert_eq!(bytes[sof + 11], 0x22);
        assert_eq!(bytes[sof + 14], 0x11);
        // IJG quality 75 scales the standard luminance table's first entry 16 to 16·50/100·… = 8.
        let dqt = bytes.windows(2).position(|w| w == [0xFF, 0xDB]).unwrap();
        assert_eq!(bytes[dqt + 5], 8);
    }

    #[test]
    fn specs_parse_and_print_back() {
        for (spec, codec) in [
            ("jpeg", ImageCodec::Jpeg { quality: 75 }),
            ("JPG:q=30", ImageCodec::Jpeg { quality: 30 }),
            ("webp", ImageCodec::Webp { quality: 80.0 }),
            ("webp:quality=12.5", ImageCodec::Webp { quality: 12.5 }),
            ("png", ImageCodec::Png),
        ] {
            let parsed: ImageCodec = spec.parse().unwrap();
            assert_eq!(parsed, codec, "{spec}");
            assert_eq!(parsed.to_string().parse::<ImageCodec>().unwrap(), codec);
        }
        for bad in [
            "gif",
            "jpeg:q=0",
            "jpeg:q=101",
            "jpeg:q=7.5",
            "webp:q=-1",
            "png:q=3",
            "jpeg:x=3",
            "",
        ] {
            assert!(bad.parse::<ImageCodec>().is_err(), "{bad}");
        }
    }
}
