//! `moe`: a routed mixture of gated experts, as mlx-lm's sparse MoE blocks
//! with a `SwitchGLU`: a router scores the experts per token and the top-k
//! run through stacked expert weights (`[E, out, in]`).
use super::{choice, expect_flat, op, Act, Layout, OpError, Resolved, WeightName, WeightReq};

choice! {
    /// How routing scores come from the router's logits.
    pub enum Routing {
        SoftmaxTopk = "softmax_topk",
        TopkSoftmax = "topk_softmax",
        SigmoidTopk = "sigmoid_topk",
    }
}

choice! {
    /// How a group of experts is scored for group-limited routing.
    pub enum GroupScore {
        Max = "max",
        Top2Sum = "top2_sum",
    }
}

op! {
    /// Top-k routed mixture of gated (GLU) experts with stacked weights and gather matmuls.
    "moe" (1..=1) => Moe {
        router: WeightName, "module holding the router `weight` [experts, in]";
        experts: WeightName, "module holding stacked `gate_proj`, `up_proj` [experts, hidden, in] and `down_proj` [experts, in, hidden]";
        num_experts: i64, "number of experts";
        top_k: i64, "experts per token";
        hidden: i64, "an expert's intermediate width";
        routing: Routing = Routing::SoftmaxTopk, "softmax_topk: softmax over all experts, then the top k; topk_softmax: the top k logits, then a softmax over them; sigmoid_topk: float32 sigmoid scores, then the top k";
        norm_topk: bool = false, "renormalise the k scores to sum to 1";
        scale: f64 = 1.0, "factor on the routing weights (routed_scaling_factor)";
        correction_bias: bool = false, "the router has `e_score_correction_bias` [experts], added to the scores to choose experts (not to weight them)";
        groups: i64 = 1, "expert groups for group-limited routing (1: none)";
        topk_groups: i64 = 1, "groups whose experts may be chosen (the others are zeroed first)";
        group_score: GroupScore = GroupScore::Max, "a group's score: its best expert (max) or its two best summed (top2_sum)";
        act: Act = Act::Silu, "activation of the gate projection";
    }
}

impl Moe {
    pub fn resolve(&self, scope: &str, inputs: &[Layout]) -> Result<Resolved, OpError> {
        let d = expect_flat(inputs, 0)?;
        let (e, k, f) = (self.num_experts, self.top_k, self.hidden);
        if e < 1 || k < 1 || k > e {
            return Err(OpError::new(
                "top_k",
                format!("top_k {k} must be between 1 and num_experts {e}"),
            ));
        }
        let (g, tg) = (self.groups, self.topk_groups);
        if g < 1 || e % g != 0 || tg < 1 || tg > g {
            return Err(OpError::new(
                "groups",
                format!("{g} groups of {e} experts with {tg} kept: groups must divide the experts and 1 <= topk_groups <= groups"),
            ));
        }
        let (router, experts) = (self.router.under(scope), self.experts.under(scope));
        let mut weights = vec![
            WeightReq::matrix("router", router.clone(), "weight", vec![e, d]),
            WeightReq::matrix(
                "experts",
                format!("{experts}.gate_proj"),
                "weight",
                vec![e, f, d],
            ),
            WeightReq::matrix(
                "experts",
                format!("{experts}.up_proj"),
                "weight",
                vec![e, f, d],
            ),
            WeightReq::matrix(
                "experts",
                format!("{experts}.down_proj"),
                "weight",
                vec![e, d, f],
            ),
        ];
        if self.correction_bias {
            weights.push(WeightReq::dense(
                "correction_bias",
                router,
                "e_score_correction_bias",
                vec![e],
            ));
        }
        Ok(Resolved {
            weights,
            ..Resolved::pure(Layout::flat(d))
        })
    }
}
