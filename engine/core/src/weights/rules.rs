//! Weight-name rules: patterns with captures (`{i}` matches one dotted
//! segment, `{rest*}` any tail) applied to checkpoint tensor names.
use indexmap::IndexMap;
use mlx_rs::Array;

pub use lmspec_spec::pattern::Pattern;
use lmspec_spec::raw::RawRule;

/// Tensors after the rules, and the ties that were made (target, source).
#[derive(Debug)]
pub struct Applied<T = Array> {
    pub tensors: IndexMap<String, T>,
    pub ties: Vec<(String, String)>,
}

/// What rules can rewrite: tensors, or their shapes read from headers.
pub trait RuleValue: Clone {
    /// The 2-D value with its axes swapped.
    fn transposed(&self) -> Result<Self, String>;
    /// Values of one shape stacked along a new first axis.
    fn stacked(items: &[Self]) -> Result<Self, String>;
}

impl RuleValue for Array {
    fn transposed(&self) -> Result<Array, String> {
        match self.ndim() {
            2 => Ok(self.t()),
            n => Err(format!("transpose: tensor has {n} axes, expected 2")),
        }
    }

    fn stacked(items: &[Array]) -> Result<Array, String> {
        if items.windows(2).any(|w| w[0].shape() != w[1].shape()) {
            return Err("stack: the tensors differ in shape".into());
        }
        mlx_rs::ops::stack(items, 0).map_err(|e| format!("stack: {e}"))
    }
}

impl RuleValue for Vec<i64> {
    fn transposed(&self) -> Result<Vec<i64>, String> {
        match self.as_slice() {
            [a, b] => Ok(vec![*b, *a]),
            s => Err(format!(
                "transpose: tensor has {} axes, expected 2",
                s.len()
            )),
        }
    }

    fn stacked(items: &[Vec<i64>]) -> Result<Vec<i64>, String> {
        let first = items.first().ok_or("stack: nothing to stack")?;
        if items.iter().any(|s| s != first) {
            return Err("stack: the tensors differ in shape".into());
        }
        Ok(std::iter::once(items.len() as i64)
            .chain(first.iter().copied())
            .collect())
    }
}

/// Applies rules in order to a name -> tensor map (or any name -> value map,
/// e.g. shapes read from headers). `truthy` evaluates a rule's `when`.
pub fn apply<T: RuleValue>(
    rules: &[&RawRule],
    mut tensors: IndexMap<String, T>,
    truthy: &dyn Fn(&serde_yaml::Value) -> Result<bool, String>,
) -> Result<Applied<T>, String> {
    let mut ties = Vec::new();
    for rule in rules {
        match rule {
            RawRule::SkipIfPresent(p) => {
                let p = Pattern::parse(p)?;
                if tensors.keys().any(|k| p.matches(k).is_some()) {
                    break;
                }
            }
            RawRule::Drop(p) => {
                let p = Pattern::parse(p)?;
                tensors.retain(|k, _| p.matches(k).is_none());
            }
            RawRule::Transpose(p) => {
                let p = Pattern::parse(p)?;
                for (k, v) in tensors.iter_mut() {
                    if p.matches(k).is_some() {
                        *v = v.transposed().map_err(|e| format!("{e} ('{k}')"))?;
                    }
                }
            }
            RawRule::Rename { from, to } => {
                let (from, to) = (Pattern::parse(from)?, Pattern::parse(to)?);
                let mut out = IndexMap::with_capacity(tensors.len());
                for (k, v) in tensors {
                    let name = match from.matches(&k) {
                        Some(caps) => to.fill(&caps)?,
                        None => k,
                    };
                    if out.insert(name.clone(), v).is_some() {
                        return Err(format!("rename gives two tensors the name '{name}'"));
                    }
                }
                tensors = out;
            }
            RawRule::Stack { from, to, index } => {
                tensors = stack(tensors, &Pattern::parse(from)?, &Pattern::parse(to)?, index)?;
            }
            RawRule::Tie {
                target,
                source,
                when,
                if_missing,
            } => {
                if let Some(w) = when {
                    if !truthy(w)? {
                        continue;
                    }
                }
                let tprefix = format!("{target}.");
                let sprefix = format!("{source}.");
                if *if_missing && tensors.keys().any(|k| k.starts_with(&tprefix)) {
                    continue;
                }
                tensors.retain(|k, _| !k.starts_with(&tprefix));
                let tied: Vec<(String, T)> = tensors
                    .iter()
                    .filter_map(|(k, v)| {
                        k.strip_prefix(&sprefix)
                            .map(|s| (format!("{tprefix}{s}"), v.clone()))
                    })
                    .collect();
                if tied.is_empty() {
                    return Err(format!(
                        "tie: no tensors under '{source}' to tie '{target}' to"
                    ));
                }
                tensors.extend(tied);
                ties.push((target.to_string(), source.to_string()));
            }
        }
    }
    Ok(Applied { tensors, ties })
}

/// The `stack` rule: tensors matching `from` grouped by their `to` name,
/// each group stacked in `index` order, which must run 0, 1, ... n-1. The
/// stacked tensor takes the place of the group's first member.
fn stack<T: RuleValue>(
    tensors: IndexMap<String, T>,
    from: &Pattern,
    to: &Pattern,
    index: &str,
) -> Result<IndexMap<String, T>, String> {
    let mut groups: IndexMap<String, Vec<(usize, String)>> = IndexMap::new();
    for k in tensors.keys() {
        if let Some(caps) = from.matches(k) {
            let i: usize = caps[index]
                .parse()
                .map_err(|_| format!("stack: '{k}': index '{}' is not a number", caps[index]))?;
            groups
                .entry(to.fill(&caps)?)
                .or_default()
                .push((i, k.clone()));
        }
    }
    if groups.is_empty() {
        return Ok(tensors);
    }
    let mut members: IndexMap<String, String> = IndexMap::new();
    for (name, list) in &mut groups {
        list.sort();
        if let Some((pos, _)) = list.iter().enumerate().find(|(pos, (i, _))| pos != i) {
            return Err(format!(
                "stack: '{name}' has no member {pos} (members {:?})",
                list.iter().map(|(i, _)| *i).collect::<Vec<_>>()
            ));
        }
        for (_, k) in list.iter() {
            members.insert(k.clone(), name.clone());
        }
    }
    let mut out = IndexMap::with_capacity(tensors.len());
    for (k, v) in &tensors {
        match members.get(k) {
            None => {
                if out.insert(k.clone(), v.clone()).is_some() || groups.contains_key(k) {
                    return Err(format!("stack gives two tensors the name '{k}'"));
                }
            }
            Some(name) if !out.contains_key(name) => {
                let items: Vec<T> = groups[name]
                    .iter()
                    .map(|(_, m)| tensors[m].clone())
                    .collect();
                let stacked = T::stacked(&items).map_err(|e| format!("{e} ('{name}')"))?;
                out.insert(name.clone(), stacked);
            }
            Some(_) => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_and_fill() {
        let p = Pattern::parse("blk.{i}.attn_q.{s}").unwrap();
        let caps = p.matches("blk.12.attn_q.weight").unwrap();
        assert_eq!(caps["i"], "12");
        assert_eq!(caps["s"], "weight");
        assert!(p.matches("blk.12.attn_k.weight").is_none());
        assert!(p.matches("blk.1.2.attn_q.weight").is_none());
        let to = Pattern::parse("model.layers.{i}.self_attn.q_proj.{s}").unwrap();
        assert_eq!(
            to.fill(&caps).unwrap(),
            "model.layers.12.self_attn.q_proj.weight"
        );
        let tail = Pattern::parse("transformer.{rest*}").unwrap();
        assert_eq!(tail.matches("transformer.h.0.x").unwrap()["rest"], "h.0.x");
    }

    #[test]
    fn bad_patterns() {
        assert!(Pattern::parse("a.{i").is_err());
        assert!(Pattern::parse("a.{}.b").is_err());
        assert!(Pattern::parse("a.{i}{j}").is_err());
        let caps = IndexMap::new();
        assert!(Pattern::parse("x.{i}").unwrap().fill(&caps).is_err());
    }

    #[test]
    fn stack_groups_by_target_in_index_order() {
        let rule = RawRule::Stack {
            from: "l.{l}.experts.{e}.{m}.weight".into(),
            to: "l.{l}.switch.{m}.weight".into(),
            index: "e".into(),
        };
        let mut t: IndexMap<String, Vec<i64>> = IndexMap::new();
        for e in [1, 0, 2] {
            for m in ["up", "down"] {
                t.insert(format!("l.0.experts.{e}.{m}.weight"), vec![4, 8]);
            }
        }
        t.insert("l.0.gate.weight".into(), vec![3, 8]);
        let out = apply(&[&rule], t, &|_| Ok(true)).expect("stacks").tensors;
        let names: Vec<&str> = out.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "l.0.switch.up.weight",
                "l.0.switch.down.weight",
                "l.0.gate.weight"
            ]
        );
        assert_eq!(out["l.0.switch.up.weight"], vec![3, 4, 8]);

        let mut gap: IndexMap<String, Vec<i64>> = IndexMap::new();
        gap.insert("l.0.experts.0.up.weight".into(), vec![4, 8]);
        gap.insert("l.0.experts.2.up.weight".into(), vec![4, 8]);
        let e = apply(&[&rule], gap, &|_| Ok(true)).unwrap_err();
        assert!(e.contains("has no member 1"), "{e}");
    }

    #[test]
    fn stacked_arrays_keep_member_order() {
        let a = Array::from_slice(&[1.0f32, 2.0], &[2]);
        let b = Array::from_slice(&[3.0f32, 4.0], &[2]);
        let s = Array::stacked(&[a, b]).expect("stack");
        assert_eq!(s.shape(), &[2, 2]);
        assert_eq!(s.as_slice::<f32>(), &[1.0, 2.0, 3.0, 4.0]);
    }
}
