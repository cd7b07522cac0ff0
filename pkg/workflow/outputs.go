package workflow

import (
	"slices"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
)

// NodeClasses tells the output nodes among node classes: ComfyUI runs a graph only
// from its output nodes (object_info's output_node), and rejects one that has none.
type NodeClasses interface {
	// Output reports whether class is an output node, and whether class is known.
	Output(class string) (output, known bool)
}

// StockClasses knows the classes of a stock ComfyUI (v0.3.65) that graphs commonly
// use, and VideoHelperSuite's VHS_VideoCombine: the output nodes among them, and
// common classes that are not. It judges graphs while no node's inventory is known.
var StockClasses NodeClasses = stockClasses{}

type stockClasses struct{}

func (stockClasses) Output(class string) (output, known bool) {
	if slices.Contains(stockOutputs, class) {
		return true, true
	}
	return false, slices.Contains(stockOthers, class)
}

// stockOutputs are the output nodes of a stock ComfyUI and VHS_VideoCombine.
var stockOutputs = []string{
	"CLIPSave", "CheckpointSave", "ImageOnlyCheckpointSave", "LoraSave", "MaskPreview", "ModelSave",
	"Preview3D", "Preview3DAnimation", "PreviewAny", "PreviewAudio", "PreviewImage",
	"SaveAnimatedPNG", "SaveAnimatedWEBP", "SaveAudio", "SaveAudioMP3", "SaveAudioOpus", "SaveGLB",
	"SaveImage", "SaveImageWebsocket", "SaveLatent", "SaveLoRANode", "SaveSVGNode", "SaveVideo", "SaveWEBM",
	"VAESave", "VHS_VideoCombine",
}

// stockOthers are stock classes that are not output nodes.
var stockOthers = []string{
	"BasicGuider", "BasicScheduler", "CFGGuider", "CLIPLoader", "CLIPSetLastLayer", "CLIPTextEncode",
	"CLIPTextEncodeSDXL", "CLIPTextEncodeSDXLRefiner", "CLIPVisionEncode", "CLIPVisionLoader",
	"CheckpointLoader", "CheckpointLoaderSimple", "ConditioningAverage", "ConditioningCombine",
	"ConditioningConcat", "ConditioningSetArea", "ConditioningSetMask", "ControlNetApply",
	"ControlNetApplyAdvanced", "ControlNetLoader", "DualCLIPLoader", "EmptyImage", "EmptyLatentImage",
	"EmptySD3LatentImage", "FluxGuidance", "ImageBatch", "ImageBlend", "ImageBlur", "ImageCrop",
	"ImageInvert", "ImageOnlyCheckpointLoader", "ImagePadForOutpaint", "ImageScale", "ImageScaleBy",
	"ImageScaleToTotalPixels", "ImageSharpen", "ImageToMask", "ImageUpscaleWithModel", "InvertMask",
	"KSampler", "KSamplerAdvanced", "KSamplerSelect", "LatentUpscale", "LatentUpscaleBy", "LoadImage",
	"LoadImageMask", "LoraLoader", "LoraLoaderModelOnly", "MaskToImage", "ModelSamplingDiscrete",
	"ModelSamplingFlux", "ModelSamplingSD3", "RandomNoise", "RepeatLatentBatch", "SVD_img2vid_Conditioning",
	"SamplerCustom", "SamplerCustomAdvanced", "SetLatentNoiseMask", "UNETLoader", "UpscaleModelLoader",
	"VAEDecode", "VAEDecodeTiled", "VAEEncode", "VAEEncodeForInpaint", "VAEEncodeTiled", "VAELoader",
	"VideoLinearCFGGuidance",
}

// checkOutputs fails a graph all of whose classes are known and none an output.
func checkOutputs(g fleet.Graph, classes NodeClasses) error {
	if classes == nil {
		return nil
	}
	for _, n := range g {
		class, _ := n.(map[string]any)["class_type"].(string)
		if output, known := classes.Output(class); output || !known {
			return nil
		}
	}
	return &GraphError{Message: "has no output node (ComfyUI: Prompt has no outputs); end it with a node that saves or previews its result, such as SaveImage, PreviewImage, SaveAnimatedWEBP or VHS_VideoCombine"}
}
