//! RGB8 the way PIL's `convert("RGB")` makes it: alpha dropped, not
//! composited; grayscale replicated; 16-bit samples cut to their high byte.

use image::DynamicImage;

/// RGB8 the way PIL's `convert("RGB")` makes it (see the [module docs](super), step 3).
pub(super) fn to_rgb8_pil(img: DynamicImage) -> Vec<u8> {
    fn map<T: Copy, const N: usize>(src: &[T], f: impl Fn(&[T]) -> [u8; 3]) -> Vec<u8> {
        let mut out = Vec::with_capacity(src.len() / N * 3);
        for p in src.chunks_exact(N) {
            out.extend_from_slice(&f(p));
        }
        out
    }
    let hi = |v: u16| (v >> 8) as u8;
    match img {
        DynamicImage::ImageRgb8(b) => b.into_raw(),
        DynamicImage::ImageRgba8(b) => map::<u8, 4>(b.as_raw(), |p| [p[0], p[1], p[2]]),
        DynamicImage::ImageLuma8(b) => map::<u8, 1>(b.as_raw(), |p| [p[0]; 3]),
        DynamicImage::ImageLumaA8(b) => map::<u8, 2>(b.as_raw(), |p| [p[0]; 3]),
        DynamicImage::ImageRgb16(b) => map::<u16, 3>(b.as_raw(), |p| [hi(p[0]), hi(p[1]), hi(p[2])]),
        DynamicImage::ImageRgba16(b) => map::<u16, 4>(b.as_raw(), |p| [hi(p[0]), hi(p[1]), hi(p[2])]),
        DynamicImage::ImageLuma16(b) => map::<u16, 1>(b.as_raw(), |p| [hi(p[0]); 3]),
        DynamicImage::ImageLumaA16(b) => map::<u16, 2>(b.as_raw(), |p| [hi(p[0]); 3]),
        other => other.to_rgb8().into_raw(),
    }
}

#[cfg(test)]
mod tests {
    use crate::data::image::decode_rgb8;
    use crate::data::image::test_util::{fixtures, S};
    use tessera_job::image::ImageConfig;

    #[test]
    fn rgba_and_gray_load_as_rgb() {
        let cfg = ImageConfig::new(S);
        let (rgba, w, h) = decode_rgb8(&fixtures().join("rgba_64x40.png"), &cfg).unwrap();
        assert_eq!((rgba.len(), w, h), (64 * 40 * 3, 64, 40));
        // The alpha-0 column keeps its colour (PIL drops alpha, no compositing).
        let raw = image::open(fixtures().join("rgba_64x40.png")).unwrap().to_rgba8();
        assert_eq!(raw.get_pixel(0, 0)[3], 0);
        assert_eq!(&rgba[..3], &raw.get_pixel(0, 0).0[..3]);
        let (gray, ..) = decode_rgb8(&fixtures().join("gray_30x30.png"), &cfg).unwrap();
        assert!(gray.chunks_exact(3).all(|p| p[0] == p[1] && p[1] == p[2]));
    }
}
