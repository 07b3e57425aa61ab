//! Facts about the MLX runtime this process is linked against.
use mlx_rs::Array;

/// Adds two small arrays; used by `doctor` as a smoke test of the binding.
pub fn smoke() -> Result<Vec<f32>, mlx_rs::error::Exception> {
    let a = Array::from_slice(&[1.0f32, 2.0, 3.0], &[3]);
    let b = Array::from_slice(&[10.0f32, 20.0, 30.0], &[3]);
    let c = mlx_rs::ops::add(&a, &b)?;
    c.eval()?;
    Ok(c.as_slice::<f32>().to_vec())
}
